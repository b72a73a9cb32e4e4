"""Training for OSDFace: stage 1 (the VRE's VQ autoencoders and their association) and stage 2
(the one-step generator's LoRA and prompt projection), on accelerate.

Both stages write weights in the layout `weights.load` reads, so `osdface restore` and
`osdface weights merge` use them unchanged.
"""
