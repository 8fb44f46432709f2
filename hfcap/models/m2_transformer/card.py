"""Model-card facts of the Meshed-Memory Transformer (from specs/m2.md and the authors' repository)."""

CARD_FACTS = {
    "name": "Meshed-Memory Transformer (M²)",
    "slug": "m2-transformer",
    # What `hfcap convert m2-transformer` sets for the released checkpoint: region features, the authors' quirks.
    "converted_config": {"use_backbone": False, "mask_padded_regions": False, "pad_regions_to": 50,
                         "position_embedding_type": "frozen_random"},
    "summary": (
        "The Meshed-Memory Transformer captions an image from a set of visual features with a fully attentive "
        "encoder-decoder. Its encoder is memory-augmented: every self-attention also attends to learned memory slots "
        "that encode prior knowledge not present in the image. Its decoder is meshed: one cross-attention reads the "
        "output of every encoder layer, and learned sigmoid gates weight and sum these levels. The authors feed it "
        "bottom-up-attention region features (Faster R-CNN, 2048-d, up to 50 regions per image); hfcap also accepts "
        "raw images through a timm backbone whose grid features take the regions' place. With converted weights the "
        "hfcap implementation computes exactly what the authors' code computes, including the behaviours that their "
        "results depend on (the frozen random position table, padded regions being attended to)."
    ),
    "paper": {
        "title": "Meshed-Memory Transformer for Image Captioning",
        "url": "https://arxiv.org/abs/1912.08226",
        "authors": "Cornia, Stefanini, Baraldi and Cucchiara",
        "venue": "CVPR 2020",
    },
    "reference_implementation": (
        "[aimagelab/meshed-memory-transformer](https://github.com/aimagelab/meshed-memory-transformer)"
    ),
    "reference_beam_search_note": (
        " (the authors' `BeamSearch`: 5 beams, 20 steps, finished beams kept among the live ones and extended with "
        "token 0 at an unchanged score, raw log-probability sums, no length penalty), which reproduces the authors' "
        "captions token for token"
    ),
    "converted": {
        "source": (
            "the authors' released checkpoint `meshed_memory_transformer.pth` and its vocabulary `vocab.pkl`"
        ),
        "dataset": "COCO (Karpathy split)",
        "dataset_id": "yerevann/coco-karpathy",
        "training_data": (
            "MS COCO 2014 images with the Karpathy splits: train + restval (about 113k images), one training sample "
            "per (image, caption) pair. Each image is represented by bottom-up-attention region features (Faster "
            "R-CNN with a ResNet-101, trained on Visual Genome; 2048-d): the first 50 detections in stored order, "
            "zero-padded to 50. Captions are lowercased, tokenised with spaCy and stripped of punctuation; the "
            "vocabulary holds the 10,197 words occurring at least 5 times in the train, restval and validation "
            "captions, plus `<unk>`, `<pad>`, `<bos>` and `<eos>` (10,201 tokens)."
        ),
        "recipe": (
            "As in the authors' `train.py`, in two stages on one GPU. (1) Cross-entropy: batch size 50, Adam "
            "(betas 0.9, 0.98) with the Transformer schedule lr = 512^-0.5 · min(step^-0.5, step · 10000^-1.5) "
            "(10,000 warm-up steps), dropout 0.1, no label smoothing, no gradient clipping; after every epoch the "
            "model is selected by validation CIDEr with beam size 5. (2) Self-critical sequence training, started when "
            "validation CIDEr has not improved for 5 epochs: Adam with learning rate 5e-6, the 5 beams of a beam "
            "search run in training mode as samples, CIDEr-D reward with the mean reward of the 5 beams as baseline; "
            "training stops when validation CIDEr has again not improved for 5 epochs. Memory slots: 40; 3 encoder "
            "and 3 decoder layers, d_model 512, 8 heads."
        ),
        "license": "bsd-3-clause",
    },
    "reported": [
        {
            "title": "COCO Karpathy test split (reported by the authors)",
            "note": (
                "the authors' numbers, not measured by hfcap: the expected output of the authors' `test.py` with the "
                "released checkpoint (`output_logs/meshed_memory_transformer_test_o`; beam size 5, consecutive "
                "duplicate words removed before scoring, no SPICE in their code) and the paper's single model. "
                "Scores ×100."
            ),
            "columns": ["source", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"],
            "rows": [
                ["released checkpoint, test.py", "80.76", "65.34", "50.93", "39.09", "29.19", "58.64", "131.20", "–"],
                ["paper, single model", "80.8", "–", "–", "39.1", "29.2", "58.6", "131.2", "22.6"],
            ],
        },
    ],
    "limitations": (
        "- The converted model takes bottom-up-attention region features (a Faster R-CNN from "
        "peteanderson80/bottom-up-attention), which hfcap does not compute; with raw images it needs a backbone and "
        "training of its own.\n"
        "- The authors' code attends to the zero rows that pad every image to 50 regions (its padding mask is computed "
        "after the input projection and masks nothing); the converted model keeps this, so its input is always padded "
        "to 50 regions.\n"
        "- The published scores use the authors' evaluation protocol (beam size 5, 20 tokens, consecutive duplicate "
        "words removed: `remove_consecutive_duplicate_words`); retrained models are reported in the authors' issues to "
        "reach CIDEr 128–129 rather than 131.2.\n"
        "- The vocabulary was built from the training and validation captions."
    ),
    "citation": (
        "@inproceedings{cornia2020m2,\n"
        "  title     = {{Meshed-Memory Transformer for Image Captioning}},\n"
        "  author    = {Cornia, Marcella and Stefanini, Matteo and Baraldi, Lorenzo and Cucchiara, Rita},\n"
        "  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition},\n"
        "  year      = {2020}\n"
        "}"
    ),
}
"""What hfcap's model cards say about M²: the model, the converted checkpoint and the authors' reported results."""
