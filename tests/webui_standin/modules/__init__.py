"""Test stand-in for the Stable Diffusion WebUI's `modules` package (see ../README.md); not the WebUI."""
