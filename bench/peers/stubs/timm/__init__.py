"""Stand-in for the one name torchscale 0.3.0 imports from timm (`timm.models.layers.drop_path`), so that
the benchmark does not install timm and torchvision. Only on sys.path in bench/bench_peers.py."""
