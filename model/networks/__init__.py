"""The networks and the one restorer call: the VRE, the restorer around the SD2.1-base VAE and
UNet, the Real-ESRGAN background network, and the fast path that runs them faster."""
