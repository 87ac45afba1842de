"""The users page (admins): add users, change roles, disable and unlock users."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine
from starlette.responses import RedirectResponse, Response

from otaflow.errors import ConflictError, InvalidInputError, NotFoundError
from otaflow.users import (
    LOGIN_WINDOW,
    MAX_FAILED_LOGINS_PER_USER,
    Role,
    check_password,
    create_user,
    failed_login_counts,
    get_user,
    list_users,
    parse_role,
    parse_user_name,
    set_disabled,
    set_role,
    unlock_user,
)
from web.portal.access import AdminDep, CsrfChecked, PortalDep
from web.portal.errors import PortalRoute
from web.portal.rendering import render

router = APIRouter(route_class=PortalRoute)

NOTICES = {
    "created": "User added.",
    "role": "Role changed.",
    "disabled": "User disabled: their sessions stop working at once.",
    "enabled": "User enabled.",
    "unlocked": "User unlocked: their failed sign-ins are cleared.",
}


class NewUserForm(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(default="", max_length=200)
    role: str = Field(default=Role.VIEWER.value, max_length=64)
    password: str = Field(default="", max_length=2000)
    password_again: str = Field(default="", max_length=2000)


class RoleForm(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str = Field(default="", max_length=64)


@router.get("/admin/users", name="users")
def users_page(
    request: Request, user: AdminDep, portal: PortalDep, notice: str = ""
) -> Response:
    context = _context(portal.engine, notice=NOTICES.get(notice))
    return render(request, "admin/users.html", context)


@router.post("/admin/users", dependencies=[CsrfChecked])
def add_user(
    request: Request,
    user: AdminDep,
    portal: PortalDep,
    form: Annotated[NewUserForm, Form()],
) -> Response:
    errors = _check_new_user(form)
    if not errors:
        try:
            role = parse_role(form.role)
            create_user(portal.engine, form.name, role, form.password, user.actor)
        except ConflictError as error:
            errors["name"] = str(error)
    if errors:
        context = _context(portal.engine, errors=errors, values=form)
        return render(request, "admin/users.html", context, status_code=422)
    return RedirectResponse("/admin/users?notice=created", status_code=303)


@router.post("/admin/users/{user_id}/role", dependencies=[CsrfChecked])
def change_role(
    user_id: int,
    request: Request,
    user: AdminDep,
    portal: PortalDep,
    form: Annotated[RoleForm, Form()],
) -> Response:
    try:
        set_role(portal.engine, user_id, parse_role(form.role), user.actor)
    except (InvalidInputError, ConflictError) as error:
        return _rejected_change(request, portal.engine, error)
    return RedirectResponse("/admin/users?notice=role", status_code=303)


@router.post("/admin/users/{user_id}/disable", dependencies=[CsrfChecked])
def disable_user(
    user_id: int, request: Request, user: AdminDep, portal: PortalDep
) -> Response:
    try:
        set_disabled(portal.engine, user_id, True, user.actor)
    except ConflictError as error:
        return _rejected_change(request, portal.engine, error)
    return RedirectResponse("/admin/users?notice=disabled", status_code=303)


@router.post("/admin/users/{user_id}/enable", dependencies=[CsrfChecked])
def enable_user(user_id: int, user: AdminDep, portal: PortalDep) -> Response:
    set_disabled(portal.engine, user_id, False, user.actor)
    return RedirectResponse("/admin/users?notice=enabled", status_code=303)


@router.post("/admin/users/{user_id}/unlock", dependencies=[CsrfChecked])
def unlock_sign_ins(user_id: int, user: AdminDep, portal: PortalDep) -> Response:
    row = get_user(portal.engine, user_id)
    if row is None:
        raise NotFoundError("user", str(user_id))
    unlock_user(portal.engine, row.name, user.actor)
    return RedirectResponse("/admin/users?notice=unlocked", status_code=303)


def _check_new_user(form: NewUserForm) -> dict[str, str]:
    errors: dict[str, str] = {}
    checks = {
        "name": lambda: parse_user_name(form.name),
        "role": lambda: parse_role(form.role),
        "password": lambda: check_password(form.password),
    }
    for field, check in checks.items():
        try:
            check()
        except InvalidInputError as error:
            errors[field] = error.message
    if "password" not in errors and form.password != form.password_again:
        errors["password_again"] = "the two passwords differ; type the same one twice"
    return errors


def _rejected_change(request: Request, engine: Engine, error: Exception) -> Response:
    message = error.message if isinstance(error, InvalidInputError) else str(error)
    context = _context(engine, error=message)
    return render(request, "admin/users.html", context, status_code=409)


def _context(engine: Engine, **values: Any) -> dict[str, Any]:
    return {
        "users": list_users(engine),
        "failed_logins": failed_login_counts(engine),
        "max_failed_logins": MAX_FAILED_LOGINS_PER_USER,
        "login_window_minutes": int(LOGIN_WINDOW.total_seconds()) // 60,
        "roles": list(Role),
        "errors": {},
        "values": NewUserForm(),
        **values,
    }
