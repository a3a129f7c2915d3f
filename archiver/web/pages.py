"""What a person sees when an answer is not a download: one template, one table of messages.

A browser (its Accept names ``text/html``) gets a small self-contained page:
``lang="ru"``, a title, one sentence saying what happened and what to do, a
few lines of inline CSS readable on a phone, no external resources.  Anyone
else (curl, a script, a download manager) gets the same sentence as
``text/plain``.  Every error answer of the service comes from ``error_page``.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass

from quart import Response
from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header


@dataclass(frozen=True)
class Message:
    title: str  # the page's <title> and heading
    sentence: str  # what happened, and what the person can do


MESSAGES: Mapping[int, Message] = {
    400: Message("Неверная ссылка", "В ссылке неверное имя файла: попросите новую ссылку у того, кто её прислал."),
    403: Message(
        "Ссылка недействительна",
        "Ссылка на архив устарела или неверна: попросите новую у того, кто её прислал.",
    ),
    404: Message("Архив не найден", "Архив не существует или был удалён: проверьте ссылку."),
    405: Message("Запрос не поддерживается", "По этому адресу архив можно только скачать: просто откройте ссылку."),
    412: Message("Архив изменился", "Архив изменился с тех пор, как его начали скачивать: скачайте его заново."),
    416: Message("Диапазон вне архива", "Запрошенная часть лежит за концом архива: начните скачивание заново."),
    431: Message(
        "Слишком длинный запрос",
        "Браузер прислал слишком длинный запрос: проверьте ссылку или удалите cookie этого сайта.",
    ),
    500: Message(
        "Не удалось создать архив",
        "Во время сборки архива произошла ошибка: попробуйте скачать его ещё раз чуть позже.",
    ),
    503: Message("Сервер занят", "Сейчас скачивают слишком много архивов: попробуйте ещё раз через несколько секунд."),
}

# A 503 for an album a file of which was gone or changed once listed, before the first byte: an upload
# under way (FTP's "x.part" renamed to "x.jpg").  Walked again in a few seconds, it is whole.
ALBUM_CHANGING = Message(
    "Архив обновляется", "В архив сейчас загружают файлы: попробуйте скачать его ещё раз через несколько секунд."
)

# A 503 for storage that does not answer (a dead network mount): not the service's load, and not for seconds.
STORAGE_SILENT = Message(
    "Хранилище не отвечает", "Файлы архива сейчас недоступны: попробуйте скачать его ещё раз через несколько минут."
)

# nginx's 503 when no instance answered (deploy/nginx.conf: 502, 504): down or restarting, which
# takes seconds (RestartSec=2), and not the load the busy page speaks of (helper 82).
NO_INSTANCE = Message(
    "Сервис недоступен", "Сервис архивов сейчас недоступен: попробуйте ещё раз через несколько секунд."
)

# On every error answer.  An error says how things are now (an album still uploading, a link
# expired): never kept by a cache.  No Referer from the page's own requests (a browser's
# /favicon.ico): the page of a signed link's 503 would hand its still valid sig to whatever
# logs the Referer (helper 71).
_ERROR_HEADERS = ((b"cache-control", b"no-store"), (b"referrer-policy", b"no-referrer"))

# Hypercorn's own 400 (and any other status it answers before the app): a request it cannot parse.
UNPARSED_REQUEST = Message(
    "Неверный запрос", "Запрос не удалось разобрать: проверьте ссылку или откройте её в браузере."
)


def unparsed_request_answer(status: int) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers and body of the answer to a request refused before the app saw it: (headers, UTF-8 text).

    Hypercorn's own refusals (``fences.hypercorn_h11``: a head over 16 KiB, a
    request line it cannot parse) and a target that is not a path
    (``fences.hypercorn_access``).  The sentence as plain text (the head was
    not read, or no route takes it: not its Accept), with the headers every
    error answer carries (``error_page``); the length is the caller's.
    """
    message = MESSAGES[status] if status in (405, 431) else UNPARSED_REQUEST
    headers = [(b"content-type", b"text/plain; charset=utf-8"), *_ERROR_HEADERS]
    if status == 405:
        # A method refused before the app (``fences.hypercorn_h11``, patch 7): every route takes GET and HEAD alone.
        headers.append((b"allow", b"GET, HEAD"))
    return headers, (message.sentence + "\n").encode()


# A 404 for a path that is not an archive's at all.
PAGE_NOT_FOUND = Message("Страница не найдена", "Такой страницы здесь нет: проверьте адрес.")

# Shared by the index page and the error pages.
STYLE = """body{font:17px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;padding:2rem 1rem;
color:#1f2328;background:#f6f8fa}main{max-width:36rem;margin:0 auto;background:#fff;border:1px solid #d0d7de;
border-radius:8px;padding:1.5rem 1.75rem}h1{font-size:1.4rem;margin:0 0 .75rem}p{margin:.5rem 0}
.code{color:#57606a;font-size:.9rem}a{color:#0969da}main{overflow-wrap:anywhere}"""

PAGE = """<!doctype html>
<html lang="ru">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<main>
<h1>{title}</h1>
{body}
</main>
</body>
</html>
"""


def page(title: str, body_html: str) -> str:
    """A whole HTML page around ``body_html`` (already escaped), in the service's look."""
    return PAGE.format(title=html.escape(title), style=STYLE, body=body_html)


def wants_html(accept: str | None) -> bool:
    """Whether the client prefers an HTML page to plain text (a browser does; curl's ``*/*`` does not)."""
    accepted = parse_accept_header(accept, MIMEAccept)
    return accepted.best_match(["text/plain", "text/html"]) == "text/html"


def error_page(
    status: int, accept: str | None, headers: dict[str, str] | None = None, message: Message | None = None
) -> Response:
    """The answer for error ``status``: HTML for a browser, the sentence as text otherwise.

    ``message`` defaults to MESSAGES[status].  The body depends on Accept, and says so (Vary).
    """
    message = message or MESSAGES[status]
    headers = {**(headers or {}), "Vary": "Accept", **{name.decode(): value.decode() for name, value in _ERROR_HEADERS}}
    if wants_html(accept):
        body = f'<p>{html.escape(message.sentence)}</p>\n<p class="code">Код ошибки: {status}</p>'
        return Response(page(message.title, body), status=status, headers=headers, mimetype="text/html")
    return Response(message.sentence + "\n", status=status, headers=headers, mimetype="text/plain")
