"""Model-card facts of Show, Attend and Tell: the model, the tutorial's released checkpoint, reported results."""

CARD_FACTS = {
    "name": "Show, Attend and Tell",
    "slug": "show-attend-tell",
    "image_size": 256,  # the released model's processor: 256x256 squash resize
    "summary": (
        "Show, Attend and Tell captions an image with an LSTM that attends, at every word, over a grid of CNN "
        "features (soft attention). This is the model of the widely used PyTorch tutorial "
        "(sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning): CNN features (ResNet-101 in the tutorial) adaptively "
        "pooled to a 14×14 grid, additive attention with ReLU, a sigmoid gate on the context vector, an `LSTMCell` "
        "decoder and a linear output layer. The hfcap implementation computes exactly what the tutorial's code "
        "computes; the paper's own variants (tanh attention, scalar gate, deep output, hard attention) are "
        "configuration switches."
    ),
    "paper": {
        "title": "Show, Attend and Tell: Neural Image Caption Generation with Visual Attention",
        "url": "https://arxiv.org/abs/1502.03044",
        "authors": "Xu, Ba, Kiros, Cho, Courville, Salakhutdinov, Zemel and Bengio",
        "venue": "ICML 2015",
    },
    "reference_implementation": "[sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning]"
    "(https://github.com/sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning) (soft attention)",
    "reference_beam_search_note": (
        " (the tutorial's `caption.py`: one image at a time, a beam that shrinks as hypotheses end, raw "
        "log-probability sums), which reproduces the tutorial's captions token for token"
    ),
    "converted": {
        "source": (
            "the tutorial author's released checkpoint `BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pth.tar` "
            "and its word map `WORDMAP_coco_5_cap_per_img_5_min_word_freq.json`"
        ),
        "dataset": "COCO (Karpathy split)",
        "dataset_id": "yerevann/coco-karpathy",
        "training_data": (
            "MS COCO 2014 images with the Karpathy splits: train + restval, 113,287 images, 5 captions per image "
            "(sampled with seed 123 where an image has more, duplicated where it has fewer), captions longer than 50 "
            "tokens dropped, the split's pre-tokenised lowercase tokens. Vocabulary: the 9,486 words occurring more "
            "than 5 times, counted over all splits (validation and test captions included), plus `<unk>`, `<start>`, "
            "`<end>` and `<pad>`."
        ),
        "recipe": (
            "As described in the tutorial's README, in two stages. (1) Decoder only, with an ImageNet-pretrained "
            "ResNet-101 frozen: Adam, learning rate 4e-4, batch size 80, cross-entropy plus the doubly stochastic "
            "attention regulariser (weight 1), dropout 0.5 before the output layer, gradients clamped to ±5; the best "
            "of 20 epochs by validation BLEU-4 (epoch 13) was kept. (2) Fine-tuning ResNet layers 2-4 as well "
            "(encoder learning rate 1e-4), batch size 32, about 3 more epochs. Images are resized to 256×256 "
            "(aspect ratio not kept) and normalised with the ImageNet mean and standard deviation."
        ),
        "license": "mit",
    },
    "reported": [
        {
            "title": "Paper, Table 1 (COCO)",
            "note": (
                "the paper's own model (VGG features, deep output, 10k-word vocabulary), not these weights; "
                "BLEU and METEOR ×100."
            ),
            "columns": ("attention", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR"),
            "rows": (
                ("soft", "70.7", "49.2", "34.4", "24.3", "23.90"),
                ("hard", "71.8", "50.4", "35.7", "25.0", "23.04"),
            ),
        },
        {
            "title": "Tutorial README (the converted checkpoint, Karpathy test split)",
            "note": (
                "BLEU-4 ×100 computed with NLTK `corpus_bleu` against 5 references per image, which is not "
                "comparable to the COCO evaluation code's BLEU-4."
            ),
            "columns": ("beam size", "test BLEU-4", "val BLEU-4"),
            "rows": (("1", "30.28", "29.98"), ("3", "33.06", "32.95"), ("5", "33.29", "33.17")),
        },
    ],
    "limitations": (
        "- Images are squashed to a square (256×256 in the tutorial) and described from a coarse feature grid "
        "(14×14); small objects and text in the image are often missed.\n"
        "- The tutorial built its vocabulary from all splits, test included, and selected its checkpoint with "
        "teacher-forced validation BLEU-4."
    ),
    "citation": (
        "@inproceedings{xu2015show,\n"
        "  title     = {Show, Attend and Tell: Neural Image Caption Generation with Visual Attention},\n"
        "  author    = {Xu, Kelvin and Ba, Jimmy and Kiros, Ryan and Cho, Kyunghyun and Courville, Aaron and\n"
        "               Salakhutdinov, Ruslan and Zemel, Richard and Bengio, Yoshua},\n"
        "  booktitle = {Proceedings of the 32nd International Conference on Machine Learning},\n"
        "  series    = {Proceedings of Machine Learning Research},\n"
        "  volume    = {37},\n"
        "  pages     = {2048--2057},\n"
        "  year      = {2015}\n"
        "}"
    ),
}
"""What hfcap's model cards say about Show, Attend and Tell, whatever the weights."""
