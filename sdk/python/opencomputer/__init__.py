"""Async Python client for the OpenComputer appliance: projects with encrypted secrets,
microVM sandboxes with commands, files and background sessions, and templates (imported
from an image archive or saved from a sandbox).

It talks only to the appliance named by ``api_url`` / ``OPENCOMPUTER_API_URL`` and must
never print, log or keep secret values or the API key anywhere but in the request headers.

Example::

    import asyncio
    from opencomputer import Project, Sandbox, Template

    async def main():
        await Template.import_archive("python-image.tar", "python")  # from `docker save`
        await Project.create("my-agent", template="python", egress_allowlist=["api.anthropic.com"])
        async with await Sandbox.create(project="my-agent", timeout=600) as sandbox:
            result = await sandbox.commands.run("echo hello")
            print(result.stdout)

    asyncio.run(main())
"""

from opencomputer.client import ClientConfig
from opencomputer.commands import ProcessResult
from opencomputer.errors import OpenComputerError
from opencomputer.exec import ExecOutput, ExecSession, ExecSessionInfo, ExecStream
from opencomputer.files import EntryInfo
from opencomputer.project import Project
from opencomputer.sandbox import Sandbox
from opencomputer.template import Template

__all__ = [
    "ClientConfig",
    "EntryInfo",
    "ExecOutput",
    "ExecSession",
    "ExecSessionInfo",
    "ExecStream",
    "OpenComputerError",
    "ProcessResult",
    "Project",
    "Sandbox",
    "Template",
]
