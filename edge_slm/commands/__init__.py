"""One module per `edge-slm` command (as mlx-lm does): parse the options, call one library function,
print. Heavy imports happen inside the commands, so `edge-slm --help` starts fast."""
