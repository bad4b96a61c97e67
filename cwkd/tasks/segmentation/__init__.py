"""Semantic segmentation: the task, its data, its models and mIoU."""
