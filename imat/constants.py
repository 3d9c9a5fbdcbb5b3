"""Constants shared by every stage (no heavy imports here)."""

NUM_CATEGORIES = 46
NUM_ATTRIBUTES = 294
DEFAULT_IMAGE_SIZE = 128
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("stretch", "letterbox", "center_crop")
DEFAULT_RESIZE_MODE = "stretch"
