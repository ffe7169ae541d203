FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY memory memory
COPY events events
COPY store store
COPY processors processors
COPY memories memories
RUN pip install --no-cache-dir .
ENV MEMSTREAM_RESOURCES=/app/memories
CMD ["memstream", "run", "all"]
