"""Models: takes ``--model`` (an embedded preset, a diffusers folder, a single-file checkpoint, a hub id, a
student folder) and produces a ``ModelSource`` that loads its torch modules (loading.py). presets.py and
tokenizer.py make the embedded models; condconv.py and student.py define the A-SDM student UNet."""
