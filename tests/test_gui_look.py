"""The window's look (issue 15, polish): contrast, the dark theme, the
members list, the file dialog, the message box, help, search,
notifications. Pure helpers first, with no display; then the real window
on Xvfb, driven as tests/test_gui.py drives it (its fixtures and helpers
are reused from there)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from test_gui import (
    assert_exits_cleanly,
    join_from_launcher,
    procs,
    start_gui,
    unique,
    window_and_cli,
    x,
)

import chatroom
from guidriver import LOOPBACK, Cli, Host, drop_files, ink

__all__ = ["procs", "x"]                # fixtures, used by name


# --- contrast ------------------------------------------------------------------

def test_contrast_ratio_matches_wcag_examples():
    assert chatroom.contrast_ratio("#000000", "#FFFFFF") == pytest.approx(21)
    assert chatroom.contrast_ratio("#FFFFFF", "#FFFFFF") == pytest.approx(1)
    assert chatroom.contrast_ratio("#FFFFFF", "#000000") == pytest.approx(21)   # either order
    # The example: the old hint grey on the old window, 2.2:1.
    assert chatroom.contrast_ratio("#A3A9B5", "#F5F6FA") == pytest.approx(2.2, abs=0.05)
    assert chatroom.contrast_ratio("#777777", "#FFFFFF") == pytest.approx(4.48, abs=0.01)


@pytest.mark.parametrize("colour", ["#FFF", "white", "#GG0000", "", "#1234567"])
def test_contrast_ratio_refuses_what_is_not_a_colour(colour):
    with pytest.raises(ValueError, match="not a #RRGGBB colour"):
        chatroom.contrast_ratio(colour, "#FFFFFF")


@pytest.mark.parametrize("theme", sorted(chatroom.PALETTES))
def test_every_text_colour_reaches_aa_on_every_background_it_is_drawn_on(theme):
    palette = chatroom.PALETTES[theme]
    assert set(palette) == set(chatroom.PALETTES["light"]), "the palettes name the same colours"
    weak = [(ink, paper, round(chatroom.contrast_ratio(palette[ink], palette[paper]), 2))
            for ink, paper in chatroom.TEXT_ON
            if chatroom.contrast_ratio(palette[ink], palette[paper]) < chatroom.WCAG_AA]
    assert not weak, f"{theme}: below 4.5:1: {weak}"
    avatars = [(colour, round(chatroom.contrast_ratio(chatroom.AVATAR_INK, colour), 2))
               for colour in chatroom.AVATAR_COLOURS
               if chatroom.contrast_ratio(chatroom.AVATAR_INK, colour) < chatroom.WCAG_AA]
    assert not avatars, f"initials below 4.5:1 on {avatars}"


# --- following the system ---------------------------------------------------------

def _asker(answers: dict[str, str], asked: list | None = None):
    def ask(argv):
        if asked is not None:
            asked.append(argv)
        if argv[0] not in answers:
            return ""                   # as _ask_command when the command is missing
        return answers[argv[0]]
    return ask


@pytest.mark.parametrize(("platform", "environ", "answers", "expected"), [
    ("linux", {}, {"gsettings": "'prefer-dark'\n"}, "dark"),
    ("linux", {}, {"gsettings": "'default'\n"}, "light"),
    ("linux", {}, {}, "light"),                                  # no gsettings: light
    ("linux", {"GTK_THEME": "Adwaita:dark"}, {}, "dark"),
    ("linux", {"GTK_THEME": "Adwaita"}, {"gsettings": "'prefer-light'"}, "light"),
    ("darwin", {}, {"defaults": "Dark\n"}, "dark"),
    ("darwin", {}, {}, "light"),                                 # the key is unset in light
])
def test_the_system_theme_is_read_where_it_can_be(platform, environ, answers, expected):
    assert chatroom.system_theme(platform, environ, _asker(answers)) == expected


def test_a_failing_system_query_means_light():
    def broken(argv):
        raise OSError("no such program")
    assert chatroom.system_theme("linux", {}, broken) == "light"
    assert chatroom.system_theme("darwin", {}, broken) == "light"


def test_the_flag_wins_over_the_remembered_theme_which_wins_over_the_system():
    def dark():
        return "dark"
    assert chatroom.resolve_theme("light", "dark", dark) == "light"
    assert chatroom.resolve_theme(None, "light", dark) == "light"
    assert chatroom.resolve_theme(None, None, dark) == "dark"
    assert chatroom.resolve_theme("system", "light", dark) == "dark"
    assert chatroom.resolve_theme(None, "purple", dark) == "dark"   # a hand-edited setting


def test_the_theme_flag_takes_light_dark_or_system():
    parser = chatroom.build_parser()
    assert parser.parse_args([]).theme is None
    assert parser.parse_args(["--theme", "dark"]).theme == "dark"
    with pytest.raises(SystemExit):
        parser.parse_args(["--theme", "blue"])


def test_recolouring_maps_shared_values_by_what_widgets_use():
    table = chatroom.recolour_map(chatroom.PALETTES["light"], chatroom.PALETTES["dark"])
    dark = chatroom.PALETTES["dark"]
    assert table["paper"]["#FFFFFF"] == dark["panel"]          # not `theirs`
    assert table["ink"]["#FFFFFF"] == dark["mine_text"]
    assert table["paper"]["#F5F6FA"] == dark["window"]


# --- the theme in the window ---------------------------------------------------

def _stub(tmp_path: Path, name: str, script: str) -> dict[str, str]:
    """A stand-in for a desktop command, first on PATH: the env to run with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text("#!/bin/sh\n" + script + "\n")
    (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GTK_THEME": ""}


def _hex(pixel: bytes) -> str:
    return "#" + pixel[:3].hex().upper()


def wait_pixel(x, point: tuple[int, int], colour: str, timeout: float = 10) -> None:
    """Wait until the screen at `point` is `colour` (the X server draws
    after the window asks): a deadline for a failure, not a speed test."""
    deadline = time.monotonic() + timeout
    while True:
        seen = _hex(x.pixels((point[0], point[1], 1, 1))[2])
        if seen == colour:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{point} is {seen}, not {colour}")
        time.sleep(0.1)


def _corner(box: list[int]) -> tuple[int, int]:
    return box[0] + 3, box[1] + 3


def test_the_theme_follows_the_system_when_nothing_was_picked(x, tmp_path, procs):
    env = _stub(tmp_path, "gsettings", "echo \"'prefer-dark'\"")
    gui = start_gui(x, tmp_path, procs, env=env)
    layout = gui.window("launcher")
    x.wait_viewable(layout["xid"])
    wait_pixel(x, _corner(layout["box"]), chatroom.PALETTES["dark"]["window"])
    gui.close("launcher")
    assert_exits_cleanly(gui)


def test_the_theme_toggle_recolours_the_windows_and_is_remembered(x, tmp_path, procs):
    light, dark = chatroom.PALETTES["light"], chatroom.PALETTES["dark"]
    env = _stub(tmp_path, "gsettings", "echo \"'default'\"")
    host = Host(unique("theme"), advertise=False)
    procs.append(host)
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                    "--user", "alice", env=env)
    chat = join_from_launcher(gui, x)
    x.wait_viewable(chat["xid"])
    view, window = _corner(chat["elements"]["view"]), _corner(chat["box"])
    wait_pixel(x, view, light["chat"])
    wait_pixel(x, window, light["window"])

    mark = gui.mark()
    gui.click("chat", "theme")
    assert gui.wait_for(lambda e: e.get("gui") == "theme", start=mark)["theme"] == "dark"
    wait_pixel(x, view, dark["chat"])
    wait_pixel(x, window, dark["window"])
    settings = json.loads((tmp_path / "config/chatroom/settings.json").read_text())
    assert settings["theme"] == "dark" and settings["room"] == "r"
    gui.close("chat")
    assert_exits_cleanly(gui)

    # Next time: dark, though the system says light; the launcher's toggle goes back.
    again = start_gui(x, tmp_path, procs, env=env)
    layout = again.window("launcher")
    x.wait_viewable(layout["xid"])
    wait_pixel(x, _corner(layout["box"]), dark["window"])
    mark = again.mark()
    again.click("launcher", "theme")
    assert again.wait_for(lambda e: e.get("gui") == "theme", start=mark)["theme"] == "light"
    wait_pixel(x, _corner(layout["box"]), light["window"])
    settings = json.loads((tmp_path / "config/chatroom/settings.json").read_text())
    assert settings == {"room": "r", "user": "alice", "address": f"{LOOPBACK}:{host.port}",
                        "theme": "light"}
    again.close("launcher")
    assert_exits_cleanly(again)


# --- the members list -----------------------------------------------------------

def _width(text: str) -> int:
    return 7 * len(text)                # a fixed-width stand-in for a font's measure


@pytest.mark.parametrize(("name", "keep", "width", "expected"), [
    ("bob", "  (you)", 200, "bob  (you)"),                         # fits: untouched
    ("Maximilian Alexander", "  (you)", 100, "Maxi...  (you)"),    # the name is cut
    ("Maximilian Alexander", "", 100, "Maximilian..."),
    ("Maximilian", "  (you)", 50, "Maxi..."),                      # too narrow even for "(you)"
])
def test_a_cut_name_keeps_its_marker(name, keep, width, expected):
    shown = chatroom.elide_text(name, width, _width, keep)
    assert shown == expected
    assert _width(shown) <= width


def test_a_long_name_in_the_members_list_keeps_you_visible(x, tmp_path, procs):
    host = Host(unique("members"), advertise=False)
    procs.append(host)
    me = "Maximilian-Alexander-Konstantin"       # 31 characters: an ID may have 32
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                    "--user", me)
    join_from_launcher(gui, x)
    cli = Cli(host.port, "r", "Bartholomew-Fitzgerald-Oppenheimer"[:32])
    procs.append(cli)
    members = gui.wait_for(lambda e: e.get("gui") == "members" and len(e["members"]) == 2)
    labels = {row["user"]: row["label"] for row in members["rows"]}
    assert labels[me].endswith("...  (you)"), labels     # cut, and still says it is you
    assert labels[me].startswith("Maximilian")
    assert not labels[cli.user].endswith("(you)")
    gui.close("chat")
    assert_exits_cleanly(gui)


# --- the file dialog ----------------------------------------------------------------

def test_send_file_opens_in_the_home_folder_without_dot_folders(x, tmp_path, procs):
    home = tmp_path / "home"
    for folder in ("Documents", ".cache", ".config"):
        (home / folder).mkdir(parents=True)
    (home / "photo.jpg").write_bytes(b"\xff\xd8")
    (home / ".bashrc").write_text("# hidden\n")
    host = Host(unique("dialog"), advertise=False)
    procs.append(host)
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                    "--user", "alice", env={"HOME": str(home)})
    join_from_launcher(gui, x)
    mark = gui.mark()
    gui.click("chat", "file")
    dialog = gui.wait_for(lambda e: e.get("gui") == "dialog", 20, mark)
    assert Path(dialog["folder"]) == home
    names = gui.wait_for(lambda e: e.get("gui") == "dialog_listed", 20, mark)["names"]
    assert "Documents" in names and "photo.jpg" in names, names
    assert not [name for name in names if name.startswith(".")], names
    dx, dy, dw, dh = dialog["box"]
    x.run("xdotool", "mousemove", str(dx + dw // 2), str(dy + dh // 2))
    x.key("Escape")                     # nothing chosen: nothing sent
    gui.close("chat")
    assert_exits_cleanly(gui)


# --- the message box ------------------------------------------------------------------

def test_shift_enter_starts_a_line_enter_sends_and_page_keys_scroll(x, tmp_path, procs):
    host, gui, cli = window_and_cli(x, tmp_path, procs, "box")
    mark = gui.mark()
    gui.type_into("chat", "input", "first line")
    x.key("shift+Return")
    x.type("第二行 second")
    assert gui.wait_for(lambda e: e.get("gui") == "message_box", start=mark)["lines"] == 2
    x.key("Return")
    said = cli.wait_for(lambda e: e.get("type") == "message" and e["from"] == "alice")
    assert said["text"] == "first line\n第二行 second"
    gui.shown(lambda e: e["kind"] == "message" and e["text"] == "first line\n第二行 second",
              start=mark)
    gui.wait_for(lambda e: e.get("gui") == "message_box" and e["lines"] == 1, start=mark)

    # Enough lines to scroll, then PageUp and PageDown from the message box.
    for n in range(40):
        cli.say(f"line {n}")
    last = gui.shown(lambda e: e["kind"] == "message" and e["text"] == "line 39")
    gui.painted(last)
    mark = gui.mark()
    gui.click("chat", "input")
    x.key("Prior")
    up = gui.wait_for(lambda e: e.get("gui") == "scrolled", start=mark)["view"]
    assert up[1] < 0.999, up                # no longer at the bottom
    mark = gui.mark()
    x.key("Next")
    down = gui.wait_for(lambda e: e.get("gui") == "scrolled", start=mark)["view"]
    assert down[0] > up[0], (up, down)
    gui.close("chat")
    assert_exits_cleanly(gui)


# --- help -------------------------------------------------------------------------------

def test_help_becomes_table_rows_with_the_hard_wraps_joined():
    rows = chatroom.help_rows(chatroom.HELP_TEXT)
    numbers = [number for number, _title, _text in rows]
    assert numbers[:3] == ["1", "2", "2.1"] and numbers[-1] == "5"
    assert rows[0][1] == "Text chat" and rows[0][2].startswith("type a line and press Enter")
    assert "nothing you say reaches another room." in rows[0][2]     # its wrapped lines joined
    assert rows[1] == ("2", "Video and voice calls", "")
    check = next(text for number, _title, text in rows if number == "2.1")
    assert check.startswith("Type /CHECK USERID") and "\n" not in check
    assert not any(text == "HELP" for _n, _t, text in rows)        # the heading is the panel's


def test_help_text_without_numbers_is_kept_whole():
    assert chatroom.help_rows("just\nsome words") == [("", "", "just some words")]


def test_help_opens_a_panel_not_lines_in_the_conversation(x, tmp_path, procs):
    host = Host(unique("help"), advertise=False)
    procs.append(host)
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                    "--user", "alice")
    join_from_launcher(gui, x)
    mark = gui.mark()
    gui.type_into("chat", "input", "help", enter=True)
    panel = gui.wait_for(lambda e: e.get("gui") == "help_panel" and e["open"], start=mark)
    assert [tuple(row) for row in panel["rows"]] == chatroom.help_rows(chatroom.HELP_TEXT)
    x.wait_viewable(panel["xid"])
    assert ink(x.pixels(tuple(panel["box"]))[2]) > 500, "the panel shows no text"
    assert not [e for e in gui.lines[mark:] if e.get("gui") == "shown" and e["kind"] == "help"]
    px, py, pw, ph = panel["box"]
    x.run("xdotool", "mousemove", str(px + pw // 2), str(py + ph // 2))
    x.key("Escape")
    gui.wait_for(lambda e: e.get("gui") == "help_panel" and not e["open"], start=mark)
    gui.close("chat")
    assert_exits_cleanly(gui)


# --- search -------------------------------------------------------------------------------

def test_ctrl_f_finds_scrolls_to_and_frames_each_match_then_escape_closes(x, tmp_path, procs):
    host, gui, cli = window_and_cli(x, tmp_path, procs, "search")
    cli.say("apple pie, 苹果派")
    for n in range(30):
        cli.say(f"filler {n}")
    cli.say("Apple juice")
    for n in range(5):
        cli.say(f"more {n}")
    gui.painted(gui.shown(lambda e: e["kind"] == "message" and e["text"] == "more 4"))

    mark = gui.mark()
    gui.click("chat", "input")
    x.key("ctrl+f")
    gui.wait_for(lambda e: e.get("gui") == "search" and e["open"], start=mark)
    x.type("APPLE")
    x.key("Return")
    first = gui.wait_for(lambda e: e.get("gui") == "found", start=mark)
    assert first["text"] == "Apple juice" and first["count"] == 2
    mark = gui.mark()
    x.key("Return")
    second = gui.wait_for(lambda e: e.get("gui") == "found", start=mark)
    assert second["text"] == "apple pie, 苹果派"
    assert second["view"][0] < first["view"][0], "it did not scroll up to the older match"
    # The match is framed where it now shows.
    gui.painted(second)
    fx1, fy1, fx2, fy2 = second["frame"]
    ox, oy = second["origin"]
    edge = _hex(x.pixels((fx1 + ox + 1, (fy1 + fy2) // 2 + oy, 1, 1))[2])
    assert edge == chatroom.PALETTES["light"]["found"], edge
    mark = gui.mark()
    x.key("Return")                     # round again, to the newest
    assert gui.wait_for(lambda e: e.get("gui") == "found", start=mark)["text"] == "Apple juice"
    mark = gui.mark()
    x.type("zebra")                     # a new query: none
    x.key("Return")
    assert gui.wait_for(lambda e: e.get("gui") == "found", start=mark)["count"] == 0
    x.key("Escape")
    gui.wait_for(lambda e: e.get("gui") == "search" and not e["open"], start=mark)
    gui.close("chat")
    assert_exits_cleanly(gui)


# --- notifications ------------------------------------------------------------------------

@pytest.mark.parametrize(("platform", "found", "first"), [
    ("linux", {"notify-send"}, "notify-send"),
    ("linux", set(), None),                                  # no libnotify: no notifications
    ("darwin", {"osascript"}, "osascript"),
    ("win32", {"powershell"}, "powershell"),
])
def test_the_notification_command_is_each_systems_own(platform, found, first):
    command = chatroom.notification_command('Bob "B" · r', "hi", platform,
                                            lambda name: name if name in found else None)
    assert (command[0] if command else None) == first
    if platform == "linux" and command:
        assert command[-2:] == ['Bob "B" · r', "hi"]         # arguments, never a shell line
    if platform == "darwin":
        assert '\\"B\\"' in command[2]                       # quoted for AppleScript


def test_a_message_while_the_window_is_not_focused_notifies(x, tmp_path, procs):
    record = tmp_path / "notified.txt"
    env = _stub(tmp_path, "notify-send", f'printf "%s|" "$@" >> {record}; echo >> {record}')
    host = Host(unique("notify"), advertise=False)
    procs.append(host)
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                    "--user", "alice", env=env)
    join_from_launcher(gui, x)
    cli = Cli(host.port, "r", "bob")
    procs.append(cli)
    gui.click("chat", "input")                  # here, with the focus
    mark = gui.mark()
    cli.say("while you look")
    assert gui.wait_for(lambda e: e.get("gui") == "attention", start=mark)["away"] is False
    x.look_away()                               # to another program
    mark = gui.mark()
    cli.say("while you are away 你好")
    assert gui.wait_for(lambda e: e.get("gui") == "attention", start=mark)["away"] is True
    note = gui.wait_for(lambda e: e.get("gui") == "notify", start=mark)
    assert note["title"] == "bob · r" and note["sound"] is False
    deadline = time.monotonic() + 10
    while not record.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert record.read_text().splitlines() == ["--app-name=chatroom|--|bob · r|"
                                               "while you are away 你好|"]
    # The sound toggle: on, remembered, and the next notification rings.
    mark = gui.mark()
    gui.click("chat", "sound")
    assert gui.wait_for(lambda e: e.get("gui") == "sound", start=mark)["on"] is True
    assert json.loads((tmp_path / "config/chatroom/settings.json").read_text())["sound"] == "on"
    x.look_away()
    cli.say("again")
    assert gui.wait_for(lambda e: e.get("gui") == "notify", start=mark)["sound"] is True
    gui.close("chat")
    assert_exits_cleanly(gui)


def test_a_notification_service_that_fails_is_logged_once_and_nothing_breaks(caplog):
    notifier = chatroom.Notifier(chatroom.GuiTrace(False))
    with caplog.at_level("INFO", logger=chatroom.log.name):
        notifier._run(["false"], "t", "b")                      # exits 1, as with no D-Bus
        notifier._run(["/nonexistent/notify-send"], "t", "b")   # not there at all
    said = [r.getMessage() for r in caplog.records if "notifications are off" in r.getMessage()]
    assert len(said) == 1 and "false exited 1" in said[0]


# --- drag and drop ----------------------------------------------------------------------

def test_files_dropped_on_the_window_are_sent(x, tmp_path, procs):
    host = Host(unique("drop"), advertise=False)
    procs.append(host)
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                    "--user", "alice")
    chat = join_from_launcher(gui, x)
    drops = gui.wait_for(lambda e: e.get("gui") == "drops")
    cli = Cli(host.port, "r", "bob", downloads=tmp_path / "bob")
    procs.append(cli)
    (tmp_path / "拖放 dropped.txt").write_text("dropped 拖放")
    (tmp_path / "folder").mkdir()
    vx, vy, vw, vh = chat["elements"]["view"]
    mark = gui.mark()
    drop_files(x, drops["interp"], drops["window"], (vx + vw // 2, vy + vh // 2),
               [str(tmp_path / "拖放 dropped.txt"), str(tmp_path / "folder")])
    assert gui.wait_for(lambda e: e.get("gui") == "dropped", start=mark)["paths"] == [
        str(tmp_path / "拖放 dropped.txt"), str(tmp_path / "folder")]
    got = cli.wait_for(lambda e: e.get("type") == "file_received", 20)
    assert Path(got["path"]).read_text() == "dropped 拖放" and got["from"] == "alice"
    gui.shown(lambda e: e["kind"] == "notice" and e["style"] == "error"
              and "folder is a folder" in e["text"], start=mark)
    gui.close("chat")
    assert_exits_cleanly(gui)


def test_the_ask_button_goes_through_its_sizes():
    sizes = [0]
    for _ in chatroom.ASK_CHOICES:
        sizes.append(chatroom.next_ask_choice(sizes[-1])[0])
    assert sizes == [0, 10 << 20, 100 << 20, 1 << 30, 2 ** 63, 0]
    assert chatroom.next_ask_choice(5 << 20) == (10 << 20, "10M")    # a flag's odd size
    assert [chatroom.ask_button_text(size) for size in sizes[:5]] == [
        "Ask: every file", "Ask: over 10 MB", "Ask: over 100 MB", "Ask: over 1 GB",
        "Ask: never"]
    assert chatroom.ask_button_text(1536 * 1024) == "Ask: over 1.5 MB"
    for size, setting in chatroom.ASK_CHOICES:     # each setting reads back as its size
        assert chatroom.window_ask_above(None, setting) == size


def test_the_ask_button_changes_which_files_wait_and_is_remembered(x, tmp_path, procs):
    """The window asks above 100 MB at first; three clicks on the Ask
    button (1 GB, never, every file) and a 2 KB file waits for Accept; the
    choice is in settings.json, and a restarted window starts with it."""
    host = Host(unique("ask"), advertise=False)
    procs.append(host)
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                    "--user", "alice")
    join_from_launcher(gui, x)
    bob = Cli(host.port, "r", "bob", downloads=tmp_path / "bob-downloads")
    procs.append(bob)
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 2048)
    bob.say(f"/send {small}")                           # under 100 MB: it just comes
    gui.wait_for(lambda e: e.get("gui") == "file_card" and e["state"] == "done")
    for expected in ("1G", "never", "0"):
        mark = gui.mark()
        gui.click("chat", "ask")
        assert gui.wait_for(lambda e: e.get("gui") == "ask_above",
                            start=mark)["setting"] == expected
    settings = json.loads((tmp_path / "config/chatroom/settings.json").read_text())
    assert settings["ask_above"] == "0"
    mark = gui.mark()
    bob.say(f"/send {small}")
    asking = gui.wait_for(lambda e: e.get("gui") == "file_card" and e["state"] == "asking",
                          start=mark)
    assert asking["status"] == "Take this file?"
    gui.close("chat")
    assert_exits_cleanly(gui)
    again = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room",
                      "r", "--user", "alice")
    chat = join_from_launcher(again, x)
    assert chat["elements"]["ask"][2] > 0
    mark = again.mark()
    again.click("chat", "ask")                          # from "every file" on to 10 MB
    assert again.wait_for(lambda e: e.get("gui") == "ask_above",
                          start=mark)["setting"] == "10M"
    again.close("chat")
    assert_exits_cleanly(again)
