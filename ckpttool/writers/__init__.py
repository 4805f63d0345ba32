"""Writers: torch zip (``pt``) and safetensors, all through one atomic-output helper."""
