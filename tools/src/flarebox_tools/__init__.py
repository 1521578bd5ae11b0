"""flarebox_tools: the host-side wing beside the flarebox runtime, never installed in an image.

evaluation (the organisers' evaluation), convert (OpenVINO IR, INT8), training (trainer, demo
weights, CT-to-MRI transfer), phantoms, metrics (FLARE DSC/NSD), bench (`make bench*`); one
command, `flarebox-tools` (cli.py).
"""
