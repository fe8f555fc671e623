"""The toy world: a synthetic captioned world of coloured shapes, a Stable-Diffusion-shaped pipeline trained on
it by the project's own recipe (shipped as ``asdm:toyworld``), and a judge that reads generated images."""
