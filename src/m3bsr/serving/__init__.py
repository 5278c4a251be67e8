"""Serving: top-k recommendation from a trained run (:mod:`recommend`), the HTTP service
(:mod:`app`, FastAPI + uvicorn, micro-batched) and the ``recommend``/``serve`` commands.

The FastAPI app is imported lazily (``m3bsr[serve]`` extra); :class:`Recommender` needs only torch.
"""

from m3bsr.serving.recommend import Event, Recommendation, Recommender

__all__ = ["Event", "Recommendation", "Recommender"]
