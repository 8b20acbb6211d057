"""The gate receiver: an HTTP endpoint for MLflow's registry webhooks, and the command that subscribes it.

    export MUCO_GATE_SECRET=...   # the webhook's HMAC secret, shared with the MLflow server
    python -m muco_flow.registry.gate_server serve --port 5055
    python -m muco_flow.registry.gate_server register-webhook --url http://HOST:5055/webhook

Both read the `registry` and `mlflow` parameters from the project's conf/
(``--conf-source``), as the `promote` pipeline does; MLFLOW_TRACKING_URI wins
as everywhere. The server is FastAPI on uvicorn (what ``mlflow server`` runs on).
A delivery without a valid signature is answered 401 and changes nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, HTTPException, Request  # module-level: FastAPI resolves the handlers' annotations here
from starlette.concurrency import run_in_threadpool

from muco_flow.registry import CHAMPION
from muco_flow.registry.config import RegistryConfig
from muco_flow.registry.gate import ALIAS_CREATED, check_champion, register_gate_webhook, signature_is_valid
from muco_flow.tracking import resolve_tracking_uri

logger = logging.getLogger(__name__)

SECRET_VARIABLE = "MUCO_GATE_SECRET"
WEBHOOK_PATH = "/webhook"


def create_app(tracking_uri: str, config: RegistryConfig, secret: str):
    """The receiver: POST /webhook (signed deliveries), GET /health."""
    from mlflow.tracking import MlflowClient
    from mlflow.webhooks.constants import (
        WEBHOOK_DELIVERY_ID_HEADER,
        WEBHOOK_SIGNATURE_HEADER,
        WEBHOOK_TIMESTAMP_HEADER,
    )

    app = FastAPI(title="muco-flow promotion gate")
    client = MlflowClient(tracking_uri)
    policy = config.promotion_policy()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "model": config.model_name}

    @app.post(WEBHOOK_PATH)
    async def webhook(request: Request) -> dict[str, Any]:
        body = await request.body()
        headers = request.headers
        signed = signature_is_valid(
            secret,
            headers.get(WEBHOOK_DELIVERY_ID_HEADER, ""),
            headers.get(WEBHOOK_TIMESTAMP_HEADER, ""),
            body,
            headers.get(WEBHOOK_SIGNATURE_HEADER, ""),
        )
        if not signed:
            raise HTTPException(status_code=401, detail="missing or invalid webhook signature")
        delivery = json.loads(body)
        data = delivery.get("data", {})
        event = f"{delivery.get('entity')}.{delivery.get('action')}"
        if event != ALIAS_CREATED or data.get("alias") != CHAMPION or data.get("name") != config.model_name:
            return {"checked": False, "event": event}
        decision = await run_in_threadpool(check_champion, client, data["name"], str(data["version"]), policy)
        return {"checked": True, **asdict(decision)}

    return app


def load_project_parameters(conf_source: str, env: str | None) -> tuple[str, RegistryConfig]:
    """(tracking URI, RegistryConfig) from the project's configuration, as `kedro run` reads it."""
    from kedro.config import OmegaConfigLoader

    parameters = OmegaConfigLoader(conf_source, base_env="base", default_run_env="local", env=env)["parameters"]
    tracking_uri = resolve_tracking_uri(parameters.get("mlflow", {}).get("tracking_uri"))
    return tracking_uri, RegistryConfig.from_dict(parameters["registry"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m muco_flow.registry.gate_server", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--conf-source", default="conf", help="the project's conf/ folder (default: conf)")
    parser.add_argument("--env", default=None, help="the Kedro configuration environment (default: local)")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="receive webhook deliveries and enforce the gate")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=5055)
    register = commands.add_parser("register-webhook", help="subscribe the receiver at --url (idempotent)")
    register.add_argument("--url", required=True, help=f"the receiver's address, ending in {WEBHOOK_PATH}")
    args = parser.parse_args(argv)

    secret = os.environ.get(SECRET_VARIABLE)
    if not secret:
        raise SystemExit(f"set {SECRET_VARIABLE}: the HMAC secret the MLflow server signs deliveries with")
    tracking_uri, config = load_project_parameters(args.conf_source, args.env)
    if args.command == "serve":
        import uvicorn

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        uvicorn.run(create_app(tracking_uri, config, secret), host=args.host, port=args.port)
    else:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        webhook = register_gate_webhook(client, config.model_name, args.url, secret, config.promotion_policy())
        print(f"webhook {webhook.name} ({webhook.webhook_id}) -> {webhook.url}: {ALIAS_CREATED}")


if __name__ == "__main__":
    main()
