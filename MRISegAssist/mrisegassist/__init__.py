"""MRISegAssist engine: brain-MRI segmentation without Slicer, Qt or VTK.

Array convention everywhere in the engine: numpy arrays are indexed ``[k, j, i]`` (z, y, x), the order
``SimpleITK.GetArrayFromImage`` returns. Voxel indices written as IJK are ``(i, j, k)`` = (x, y, z).
Physical coordinates are LPS millimetres (ITK's convention); RAS = LPS with x and y negated.
"""

__version__ = "0.1.0"

from .errors import InputError, MRISegAssistError, Cancelled  # noqa: F401
