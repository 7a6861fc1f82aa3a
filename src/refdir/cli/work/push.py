"""`refdir push`: an export folder to the Hugging Face hub."""

from __future__ import annotations

from pathlib import Path

import typer
from huggingface_hub import HfApi, constants

from refdir.errors import RefdirError
from refdir.hf import hub_reachable

__all__ = ["push"]


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def push(folder: Path, repo_id: str, private: bool, pr: bool) -> None:
    """Upload ``folder`` to the model repository ``repo_id`` (made if new, private unless
    asked); ``pr``: as a pull request. The folder is only read."""
    if not folder.is_dir() or not any(folder.iterdir()):
        raise RefdirError(f"{folder} is not a folder with files; give an export folder")
    endpoint = constants.ENDPOINT
    if not hub_reachable():
        raise RefdirError(
            f"the Hugging Face hub ({endpoint}) cannot be reached from here (offline mode, or no "
            f"network); nothing was uploaded and {folder} is unchanged; push from a machine "
            "with a network"
        )
    api = HfApi(endpoint=endpoint)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            create_pr=pr,
            commit_message=f"Upload {folder.name} (refdir export)",
        )
    except Exception as exc:  # huggingface_hub raises HTTP, OS and validation errors of its own
        raise RefdirError(
            f"could not push {folder} to {repo_id}: {_one_line(exc)}; {folder} is unchanged"
        ) from None
    where = getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or str(url)
    visibility = "private" if private else "public"
    typer.echo(f"pushed {folder} to {repo_id} ({visibility}): {where}")
