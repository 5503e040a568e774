# pg-audit-proxy, run from its TypeScript sources by tsx, so there is no build step.
#
#   docker build -t pg-audit-proxy .
#   docker run --rm -p 6432:6432 \
#     -v "$PWD/config.yaml:/etc/pg-audit-proxy/config.yaml:ro" \
#     -e APP_DB_PASSWORD -e JWT_SECRET pg-audit-proxy
#
# The mounted config must set `listen.host: 0.0.0.0`, because the default 127.0.0.1 is not
# reachable from outside the container. Pass the variables that its ${VAR} references name
# with -e. Other commands run the same way, for example:
#   docker run --rm pg-audit-proxy sql install --database-url URL --app-role app_writer
#
# NOTE: written without a Docker engine at hand, so this file has never been built.
FROM node:20-slim

WORKDIR /opt/pg-audit-proxy

# Dependencies first, so that changing the sources does not reinstall them. `npm ci`
# installs exactly what package-lock.json lists; tsx, which runs the sources, is a runtime
# dependency, while the embedded PostgreSQL and the test tools are dev dependencies.
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund \
 && npm cache clean --force

COPY tsconfig.json ./
COPY bin ./bin
COPY src ./src
# `sql install` reads the SQL files from here.
COPY sql ./sql

# The node:20 images include the unprivileged user `node`. The files above stay owned by
# root, so the proxy cannot change its own code.
USER node

EXPOSE 6432

# serve stops on SIGTERM (docker stop): it ends client sessions with 57P01 and closes its
# server connections.
ENTRYPOINT ["node", "bin/pg-audit-proxy.js"]
CMD ["serve", "--config", "/etc/pg-audit-proxy/config.yaml"]
