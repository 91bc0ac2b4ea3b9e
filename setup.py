from setuptools import setup

setup(
    name="fxtp",
    version="0.1.0",
    description="Automatic tensor parallelism for HuggingFace transformers, as a torch.fx compiler",
    packages=["fxtp", "fxtp.passes"],
    package_dir={"fxtp": "fxtp", "fxtp.passes": "passes"},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "transformers>=5.17", "sympy", "safetensors"],
    # triton: tests run fxtp's push_all_reduce kernel in its interpreter on the CPU (on CUDA builds torch brings it)
    extras_require={"test": ["pytest", "hypothesis", "triton; platform_system == 'Linux'"]},
    entry_points={"console_scripts": ["fxtp=fxtp.cli:main"]},
)
