"""An example slmserve plugin distribution."""
