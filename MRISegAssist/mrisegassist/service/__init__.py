"""The segmentation service: the one pipeline every front end calls, in-process or in a worker / server process.

* :mod:`.api`: typed requests (:class:`AutoSegmentRequest`, :class:`PromptRequest`, :class:`AtlasBoxesRequest`,
  :class:`AutoRequest`, :class:`DownloadWeightsRequest`) and results (:class:`SegmentationResult`,
  :class:`AtlasBoxesResult`, :class:`WeightsStatus`, :class:`ServiceInfo`);
* :class:`Service` (:mod:`.core`): runs them in this process, holding models, engines and prepared volumes;
* clients with one interface (``submit`` / ``poll`` / ``call``): :class:`InProcessClient`, :class:`HttpClient`
  (a server at a URL; standard library only) and :class:`LocalWorker` (a server process it starts);
* :mod:`.server`: ``mrisegassist server`` (aiohttp), the protocol in :mod:`.protocol`, the wire format in
  :mod:`.wire`.

Importing this package imports neither torch nor aiohttp.
"""
from __future__ import annotations

from .api import (ATLAS_ENGINE, AtlasBoxesRequest, AtlasBoxesResult, AutoRequest, AutoSegmentRequest,  # noqa: F401
                  DownloadWeightsRequest, EngineInfo, ModelInfo, NotFound, ObjectSummary, PromptRequest,
                  SegmentationResult, ServiceInfo, WeightsStatus)
from .client import HttpClient, InProcessClient, SegmentationClient, Submission  # noqa: F401
from .core import PreparedCache, Service, available_devices, prompt_from_extents  # noqa: F401
from .protocol import JobStatus, ServiceError, ServiceUnavailable, VersionMismatch  # noqa: F401
from .worker import LocalWorker  # noqa: F401

__all__ = ["ATLAS_ENGINE", "AtlasBoxesRequest", "AtlasBoxesResult", "AutoRequest", "AutoSegmentRequest",
           "DownloadWeightsRequest", "EngineInfo", "HttpClient", "InProcessClient", "JobStatus", "LocalWorker",
           "ModelInfo", "NotFound", "ObjectSummary", "PreparedCache", "PromptRequest", "SegmentationClient",
           "SegmentationResult", "Service", "ServiceError", "ServiceInfo", "ServiceUnavailable", "Submission",
           "VersionMismatch", "WeightsStatus", "available_devices", "client_for", "prompt_from_extents"]


def client_for(server: str = None, token: str = None, device: str = None) -> SegmentationClient:
    """The client the CLI and scripts use: :class:`HttpClient` for a server URL, else in-process."""
    if server:
        return HttpClient(server, token)
    return InProcessClient(device=device)
