"""Stage 4: Danis-Weber classification of the syndesmosis crop (SE-ResNet-18), Grad-CAM and
uncertainty.

Modules, in the order the stage runs: :mod:`.plans` (what a model expects), :mod:`.crops`
(dataset case -> cached crop), :mod:`.network` (SE-ResNet-18 from MONAI blocks),
:mod:`.relation` (the relation weight network of the semi-supervised method),
:mod:`.model_io` (model folder), :mod:`.inference` (probabilities), :mod:`.uncertainty`
(test-time augmentation), :mod:`.gradcam` (where the decision came from).
"""
