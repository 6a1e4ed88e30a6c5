"""Data for napari-vstain: image readers and writers, simulated paired tissue, registration
and training patches."""
