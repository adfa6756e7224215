"""The misalignment study (Sun et al., NeurIPS 2025, experiment 3): misalign a fraction Cs of an
image-caption dataset by swapping captions (:mod:`.shuffle`), fine-tune only the projections of a
CLIP on it (``train.py experiment=misalign``), and follow feature purity as Cs grows (:mod:`.sweep`)."""
