"""Data: readers of released dataset formats (Karpathy COCO/Flickr30K, NLVR2, VQAv2) and VQA accuracy, the emoji
world, tokenizers/processors for tiny models, and the synthetic worlds."""
