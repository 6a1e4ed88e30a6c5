"""The napari side of napari-vstain: reader, writer, sample data and dock widgets named in
napari.yaml. Thin layers over the engine (no science here); torch is imported only when a
widget needs it, so napari starts fast."""
