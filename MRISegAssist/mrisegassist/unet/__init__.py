"""U-Net auto-segmentation: model entries/registry, networks, inference, post-processing and training.

Public API::

    from mrisegassist.unet import list_models, get_model, UNetSegmenter, segment_files
    labelmap = UNetSegmenter("glioma-2d").segment(case)          # case = volume.load_case({...})
"""
from .entries import ModelEntry, get_model, list_models  # noqa: F401
from .inference import UNetSegmenter, segment_files  # noqa: F401
from .postprocess import BRATS_REGIONS, region_masks, remove_small_components  # noqa: F401
