"""Task-neutral data plumbing: image decoding, transforms and loaders, device feeding."""
