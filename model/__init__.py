"""OSDFace model code: the VRE, the one-step restorer, weights, faces and images."""
