"""metaxl: MetaXL (Xia et al., NAACL 2021) on any Hugging Face encoder."""

__version__ = "0.1.0"
