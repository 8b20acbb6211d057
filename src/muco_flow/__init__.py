"""muco-flow: the MuCo multi-turn contrastive training workflow."""

__version__ = "0.1.0"
