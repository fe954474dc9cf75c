"""Training data: reading image folders with caption sidecars, and caching encoder outputs."""

from lorakit.data.folder import Item, apply_trigger, load_image, scan_folder

__all__ = ["Item", "apply_trigger", "load_image", "scan_folder"]
