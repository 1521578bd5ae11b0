"""flarebox: one engine for FLARE-style segmentation containers.

The data path, one module per stage:
    io.read_case -> preprocess.preprocess -> sliding_window.predict_logits -> export.to_original_grid
    -> io.write_labels
(one model's labels go back to the input's grid as they are written: export.Labels.slabs).
`pipeline.Predictor` strings them together for a model folder; `cli` is the command line.
"""

__version__ = "0.1.0"
