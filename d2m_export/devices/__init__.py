"""An axis, the device: what a device can do (`profiles`: one YAML per device in device_profiles/), what a
decode step costs on it (`roofline`), and the probe that measures this host (`probe`). The planner reads
them to plan by a latency budget, training to know its peak FLOP/s, the report to draw latency."""
