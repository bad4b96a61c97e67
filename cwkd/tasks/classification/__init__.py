"""Image classification: the task, its data sets, the timm model factory."""
