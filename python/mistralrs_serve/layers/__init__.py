"""What models are built from: norm, activation, rotary, linear and attention
layers, each choosing its kernel (torch, Triton or Rust) for the device."""
