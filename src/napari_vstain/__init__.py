"""napari-vstain: pixel super-resolved virtual staining of label-free tissue with a Brownian
bridge diffusion model. Heavy imports (torch) happen in the submodules that need them."""

__version__ = "0.1.0"
