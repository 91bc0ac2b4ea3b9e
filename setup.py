from setuptools import setup

# fxtp's passes live in the top-level folder passes/ and install as fxtp.passes; every package is
# listed, so a plain (non-editable) install works with the older setuptools of offline machines.
PACKAGES = {
    "fxtp": "fxtp",
    **{f"fxtp.{stage}": f"fxtp/{stage}" for stage in ("capture", "sharding", "rank_ops", "kernels", "decode", "runtime")},
    "fxtp.sharding.op_rules": "fxtp/sharding/op_rules",
    "fxtp.passes": "passes",
    **{f"fxtp.passes.{stage}": f"passes/{stage}" for stage in ("capture", "sharding", "codegen", "decode")},
}

setup(
    name="fxtp",
    version="0.1.0",
    description="Automatic tensor parallelism for HuggingFace transformers, as a torch.fx compiler",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "transformers>=5.17", "sympy", "safetensors"],
    # triton: tests run fxtp's push_all_reduce kernel in its interpreter on the CPU (on CUDA builds torch brings it);
    # expecttest: torch.testing._internal imports it, and tests/test_plain_modules.py shards torch's own TP test model;
    # pytest-xdist: the suite runs its files on two worker processes (README's test command)
    extras_require={"test": ["pytest", "pytest-xdist", "hypothesis", "expecttest", "triton; platform_system == 'Linux'"]},
    entry_points={"console_scripts": ["fxtp=fxtp.cli:main"]},
)
