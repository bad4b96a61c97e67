"""Detection and instance segmentation: the task, COCO data, models, FPN taps and COCO AP."""
