"""Detection and segmentation: PaliGemma's `<loc>`/`<seg>` answers as boxes, codes and masks."""
