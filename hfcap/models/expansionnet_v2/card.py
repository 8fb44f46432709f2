"""Model-card facts for ExpansionNet v2 (plain data; the model card is rendered from them by `hfcap.hub`).

Sources: hfcap's specification of the reference (specs/expansionnet_v2.md §1, §6-§12) and the reference repository's
README (citation) and license.txt (MIT) at commit eb7f1c98.
"""

CARD_FACTS = {
    "name": "ExpansionNet v2",
    "slug": "expansionnet-v2",
    "image_size": 384,  # the released model's processor: 384x384 squash resize
    "summary": (
        "ExpansionNet v2 captions an image end to end from a Swin Transformer: the 144 tokens of Swin-L/384's final "
        "12×12 map feed an encoder of *static expansion* layers, which mix the tokens into 992 learned expansion "
        "rows in five groups and back, and a decoder of *dynamic expansion* layers, which replace self-attention by "
        "16 expansion rows per word plus cross-attention over the image tokens; every layer's output is combined "
        "before the vocabulary projection. The hfcap implementation computes what the authors' `End_ExpansionNet_v2` "
        "computes (checked against their code's outputs in float64 and float32), decodes incrementally with an exact "
        "cache of the dynamic expansion where their code recomputes the whole prefix at every step (on a GPU, "
        "`cache_implementation=\"static\"` runs each step as one replayed CUDA graph), and offers their own beam "
        "search besides the standard Hugging Face strategies."
    ),
    "paper": {
        "title": "Exploiting Multiple Sequence Lengths in Fast End to End Training for Image Captioning",
        "url": "https://arxiv.org/abs/2208.06551",
        "authors": "Hu, Cavicchioli and Capotondi",
        "venue": "IEEE BigData 2023",
    },
    "reference_implementation": (
        "[jchenghu/ExpansionNet_v2](https://github.com/jchenghu/ExpansionNet_v2) (`End_ExpansionNet_v2`)"
    ),
    "reference_beam_search_note": (
        " (their `beam_search` in `models/captioning_model.py`: finished beams stay with a frozen score, beams are "
        "pruned by raw log-probability sums and finally ranked by the mean log-probability over the length counting "
        "SOS and EOS), which reproduces the authors' captions token for token"
    ),
    "converted": {
        "source": (
            "the authors' released checkpoint `rf_model.pth` (one member of their ensemble; 139.45 CIDEr-D on the "
            "Karpathy test split as reported by the authors) or `rf_model_140.4.pth` (their single model), with "
            "their vocabulary `demo_material/demo_coco_tokens.pickle`"
        ),
        "dataset": "COCO (Karpathy split)",
        "dataset_id": "yerevann/coco-karpathy",
        "training_data": (
            "MS COCO 2014 images with the Karpathy splits: train + restval, 113,287 images with their raw captions, "
            "lowercased, punctuation split off and dropped. Vocabulary: the words occurring at least 5 times, plus "
            "`PAD`, `SOS`, `EOS` and `UNK`, sorted alphabetically (10,000 tokens; EOS=77, PAD=78, SOS=79, UNK=80). "
            "The authors' image loading replaced every non-RGB image (COCO's grayscale ones) by a black image."
        ),
        "recipe": (
            "As described in the authors' README, in stages, all with d_model 512 and 3 + 3 layers, images "
            "squash-resized to 384×384 (bilinear) and normalised with the ImageNet mean and standard deviation, no "
            "augmentation. (1) Swin-L/384 features from the ImageNet-22k checkpoint, frozen. (2) Cross-entropy with "
            "label smoothing 0.1 on the cached features: RAdam, learning rate 2e-4 after a 10,000-iteration "
            "(hyperbolic) warm-up, ×0.8 every 2 epochs, batch 48, 8 epochs, dropout 0.3. (3) End to end with the "
            "Swin: learning rate 3e-5, ×0.55 every epoch, batch 16×3, 2 epochs, Swin drop-path 0.1. (4) Features "
            "regenerated with the fine-tuned Swin. (5) Self-critical training (CIDEr-D reward, 5 sampled captions "
            "per image with the mean of the others as baseline) on the features: learning rate 1e-4, ×0.8 every "
            "epoch, batch 24×2 images, 9 epochs, dropout 0.1. (6) Optionally self-critical end to end: learning "
            "rate 2e-6, 1 epoch."
        ),
        "license": "mit",
    },
    "reported": [
        {
            "title": "Authors' README, Karpathy test split",
            "note": (
                "reported by the authors, not measured by hfcap; beam size 5; BLEU, METEOR, ROUGE-L, CIDEr-D and "
                "SPICE ×100 with the coco-caption evaluation code. The single model is `rf_model_140.4.pth`; "
                "`rf_model.pth` scores 139.45 CIDEr-D (the authors, issue #11); the ensemble's size is not stated."
            ),
            "columns": ["model", "BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE"],
            "rows": [
                ["ensemble", "83.5", "42.7", "30.6", "61.1", "143.7", "24.7"],
                ["single", "82.8", "41.5", "30.3", "60.5", "140.4", "24.5"],
            ],
        },
        {
            "title": "Authors' README, COCO online test server",
            "note": "reported by the authors, not measured by hfcap; c5 = 5 references per image, c40 = 40.",
            "columns": ["references", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"],
            "rows": [
                ["c5", "83.3", "68.8", "54.4", "42.1", "30.4", "60.8", "138.5"],
                ["c40", "96.9", "92.6", "85.0", "75.3", "40.1", "76.4", "140.8"],
            ],
        },
    ],
    "limitations": (
        "- Images are squashed to 384×384 and described from Swin's 12×12 token grid; the authors report that "
        "low-resolution COCO images lowered CIDEr-D from about 140 to about 135 (issue #13), so scores depend on the "
        "input resolution.\n"
        "- hfcap converts grayscale and other non-RGB images to RGB; the authors' code turned them black, in training "
        "and evaluation, so results on such images can differ slightly from theirs.\n"
        "- The Swin-L backbone dominates the cost: about 1.4 s per image on two CPU cores.\n"
        "- Captions are at most 73 words (the 74-row position table includes SOS); the vocabulary holds the 10,000 "
        "COCO training words, and a weakly trained model can emit `PAD` or `UNK` as words, as the authors' code does."
    ),
    "citation": (
        "@inproceedings{hu2023exploiting,\n"
        "  title        = {Exploiting Multiple Sequence Lengths in Fast End to End Training for Image Captioning},\n"
        "  author       = {Hu, Jia Cheng and Cavicchioli, Roberto and Capotondi, Alessandro},\n"
        "  booktitle    = {2023 IEEE International Conference on Big Data (BigData)},\n"
        "  pages        = {2173--2182},\n"
        "  year         = {2023},\n"
        "  organization = {IEEE Computer Society}\n"
        "}"
    ),
}
"""What the model card says about ExpansionNet v2 (keys as `hfcap.hub`'s `Architecture`)."""
