"""What the inference commands accept, in one torch-free module so the CLI builds its help without importing
torch: the test-time augmentation views (`predictor/tta.py` implements one function per name, in this order),
the ways members combine, and the default batch size."""

VIEW_NAMES = ("identity", "hflip", "vflip", "shift_up", "shift_down", "shift_left", "shift_right", "zoom_in",
              "zoom_out")
COMBINES = ("mean", "weighted", "vote")
BATCH_SIZE = 128  # images per forward, before TTA views
