// The securechat page: the chat UI on top of the client library.
//
// Every piece of text that comes from the network (message bodies, names,
// room names, error messages) is put in the page with textContent or as an
// attribute value, never as HTML: a message "<img src=x onerror=...>" is
// shown as those characters. The page's CSP (no inline script or style,
// connections to this origin only) is the second line of defence.
//
// The page starts by itself when <body data-autostart> (index.html). An app
// that embeds it calls startChat({ token, refreshToken }) instead.

import {
  SecureChat,
  decryptMessage,
  deriveRoomKey,
  encryptMessage,
  importRoomKey,
  isRoomName,
} from "/securechat.js";

const MODERATOR_ROLES = ["admin", "moderator"];

/** Reads `#token=...` (and `join=a,b`) from the fragment and removes them from the address bar. */
export function readFragment(location = window.location, history = window.history) {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const token = params.get("token");
  const join = (params.get("join") ?? "").split(",").map((r) => r.trim()).filter(Boolean);
  if (token !== null || join.length) {
    params.delete("token");
    params.delete("join");
    const rest = params.toString();
    // The token leaves the address bar, the history entry and bookmarks.
    history.replaceState(null, "", `${location.pathname}${location.search}${rest ? `#${rest}` : ""}`);
  }
  return { token: token || null, join };
}

/**
 * Starts the chat UI in the page's markup (index.html).
 * options.token: the JWT (else the page asks for one);
 * options.refreshToken: async () => a new JWT, called on `session_expiring`
 *   and after expiry (else the user is told the session is ending);
 * options.join: rooms to join at once (default: "general", quietly).
 */
export function startChat(options = {}) {
  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"),
    statusText: $("status-text"),
    retryNow: $("retry-now"),
    identity: $("identity"),
    notice: $("notice"),
    noticeText: $("notice-text"),
    renewForm: $("renew-form"),
    renewToken: $("renew-token"),
    noticeDismiss: $("notice-dismiss"),
    login: $("login"),
    tokenForm: $("token-form"),
    tokenInput: $("token-input"),
    chat: $("chat"),
    roomList: $("room-list"),
    joinForm: $("join-form"),
    joinRoom: $("join-room"),
    joinE2e: $("join-e2e"),
    joinKeyFields: $("join-key-fields"),
    joinPassphrase: $("join-passphrase"),
    joinRaw: $("join-raw"),
    joinError: $("join-error"),
    roomTitle: $("room-title"),
    roomBadge: $("room-badge"),
    roomKey: $("room-key"),
    roomLeave: $("room-leave"),
    keyForm: $("key-form"),
    keyPassphrase: $("key-passphrase"),
    keyRaw: $("key-raw"),
    keyCancel: $("key-cancel"),
    messages: $("messages"),
    composer: $("composer"),
    composerInput: $("composer-input"),
    composerSend: $("composer-send"),
  };

  /** name -> { name, e2e, key, joined, list, item, unreadEl, unread, bySeq, locked } */
  const rooms = new Map();
  let active = null;
  let me = null;
  let countdown = null;
  let invalidFrames = 0;

  const client = new SecureChat({ url: options.url, refreshToken: options.refreshToken });

  // --- small DOM helpers (text only) ----------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function show(node, visible) {
    node.hidden = !visible;
  }
  function formatTime(ts) {
    const date = new Date(ts);
    return Number.isNaN(date.getTime()) ? "" : date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }
  function nearBottom(list) {
    return ui.messages.scrollTop + ui.messages.clientHeight >= ui.messages.scrollHeight - 48 || list.hidden;
  }
  function scrollDown() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  // --- connection state -------------------------------------------------------

  function setStatus(detail) {
    const { state } = detail;
    ui.status.dataset.state = state;
    clearInterval(countdown);
    countdown = null;
    show(ui.retryNow, state === "reconnecting");
    if (state === "reconnecting") {
      const tick = () => {
        const secs = Math.max(0, Math.ceil((detail.retryAt - Date.now()) / 1000));
        ui.statusText.textContent = `Reconnecting in ${secs} s`;
      };
      tick();
      countdown = setInterval(tick, 250);
    } else if (state === "connecting") {
      ui.statusText.textContent = detail.refreshing
        ? "Renewing the session…"
        : detail.attempt > 0 || detail.previous === "reconnecting"
          ? "Reconnecting…"
          : "Connecting…";
    } else {
      ui.statusText.textContent = { idle: "Not connected", live: "Live", expired: "Session expired", closed: "Disconnected" }[state] ?? state;
    }
    if (state === "expired") {
      showNotice("Your session has expired. Paste a new token to continue.", { renew: true });
    }
    updateControls();
  }

  function showNotice(text, { renew = false } = {}) {
    ui.noticeText.textContent = text;
    show(ui.renewForm, renew);
    show(ui.notice, true);
  }
  function hideNotice() {
    show(ui.notice, false);
    ui.renewToken.value = "";
  }

  // --- rooms ----------------------------------------------------------------

  function addRoom(name, { e2e = false, key = null } = {}) {
    let room = rooms.get(name);
    if (room) {
      room.e2e = room.e2e || e2e;
      if (key) setKey(room, key);
      return room;
    }
    const list = el("ol", "message-list");
    list.dataset.room = name;
    list.setAttribute("role", "log");
    list.setAttribute("aria-live", "polite");
    list.setAttribute("aria-label", `Messages in ${name}`);
    list.hidden = true;
    ui.messages.append(list);

    const item = el("li");
    const button = el("button", "room-button");
    button.type = "button";
    button.dataset.room = name;
    const label = el("span", "room-name", name);
    const lock = el("span", "lock", "e2e");
    lock.title = "End-to-end encrypted";
    const unreadEl = el("span", "unread");
    unreadEl.hidden = true;
    button.append(label, lock, unreadEl);
    button.addEventListener("click", () => selectRoom(name));
    item.append(button);
    ui.roomList.append(item);

    room = { name, e2e, key: null, joined: false, list, item, button, lock, unreadEl, unread: 0, bySeq: new Map(), locked: [] };
    rooms.set(name, room);
    if (key) setKey(room, key);
    refreshRoomItem(room);
    return room;
  }

  function refreshRoomItem(room) {
    room.lock.hidden = !room.e2e;
    room.unreadEl.hidden = room.unread === 0;
    room.unreadEl.textContent = room.unread ? `${room.unread} new` : "";
    room.item.classList.toggle("gone", !room.joined);
    if (room === active) {
      ui.roomKey.textContent = !room.e2e ? "Mark as encrypted…" : room.key ? "Change room key" : "Set room key";
      show(ui.roomBadge, room.e2e);
      ui.roomBadge.textContent = room.e2e ? (room.key ? "End-to-end encrypted" : "End-to-end encrypted: no key set") : "";
    }
  }

  function removeRoom(name) {
    const room = rooms.get(name);
    if (!room) return;
    rooms.delete(name);
    room.list.remove();
    room.item.remove();
    if (active === room) {
      active = null;
      const next = rooms.keys().next();
      if (!next.done) selectRoom(next.value);
      else selectRoom(null);
    }
  }

  function selectRoom(name) {
    active = name === null ? null : (rooms.get(name) ?? null);
    for (const room of rooms.values()) {
      const on = room === active;
      room.list.hidden = !on;
      if (on) room.button.setAttribute("aria-current", "true");
      else room.button.removeAttribute("aria-current");
    }
    ui.roomTitle.textContent = active ? active.name : "No room selected";
    show(ui.keyForm, false);
    if (active) {
      active.unread = 0;
      refreshRoomItem(active);
      scrollDown();
    } else {
      show(ui.roomBadge, false);
    }
    updateControls();
  }

  function updateControls() {
    const live = client.state === "live";
    const ready = live && active !== null && active.joined;
    ui.composerInput.disabled = !ready;
    ui.composerSend.disabled = !ready;
    ui.roomKey.disabled = active === null;
    ui.roomLeave.disabled = active === null;
    ui.composerInput.placeholder = !active
      ? "Join a room to write."
      : !live
        ? "Not connected: your text is kept until the connection is back."
        : "Write a message. Enter sends, Shift+Enter starts a new line.";
  }

  function systemLine(room, text, kind = "info") {
    const stick = nearBottom(room.list);
    const li = el("li", `system ${kind}`, text);
    li.setAttribute("role", "note");
    room.list.append(li);
    if (stick && room === active) scrollDown();
  }

  // --- messages ---------------------------------------------------------------

  function canDelete(message) {
    if (!me) return false;
    return message.from.sub === me.sub || me.roles.some((r) => MODERATOR_ROLES.includes(r));
  }

  function renderMessage(message) {
    const room = rooms.get(message.room);
    if (!room) return;
    const stick = nearBottom(room.list);
    const li = el("li", "message");
    li.dataset.seq = String(message.seq);
    if (me && message.from.sub === me.sub) li.classList.add("own");

    const meta = el("div", "meta");
    const sender = el("span", "sender", message.from.name);
    sender.title = message.from.sub;
    const time = el("time", "time", formatTime(message.ts));
    time.dateTime = message.ts;
    time.title = new Date(message.ts).toLocaleString();
    meta.append(sender, " ", time);
    if (message.enc) {
      const lock = el("span", "lock", "e2e");
      lock.title = "End-to-end encrypted";
      meta.append(" ", lock);
    }
    if (canDelete(message)) {
      const del = el("button", "delete link", "Delete");
      del.type = "button";
      del.setAttribute("aria-label", `Delete the message from ${message.from.name} at ${formatTime(message.ts)}`);
      del.addEventListener("click", () => {
        del.disabled = true;
        client.delete(room.name, message.seq).catch((e) => {
          del.disabled = false;
          systemLine(room, `Could not delete the message: ${e.message}`, "error");
        });
      });
      meta.append(" ", del);
    }
    const body = el("p", "body");
    li.append(meta, body);
    if (message.body !== undefined) {
      body.textContent = message.body;
    } else {
      if (!room.e2e) {
        // The server relays `enc` only in end-to-end rooms.
        room.e2e = true;
        refreshRoomItem(room);
      }
      body.classList.add("pending");
      body.textContent = "decrypting…";
      decryptInto(room, message, body);
    }
    room.list.append(li);
    room.bySeq.set(message.seq, li);
    if (room !== active) {
      room.unread += 1;
      refreshRoomItem(room);
    } else if (stick) {
      scrollDown();
    }
  }

  function decryptInto(room, message, body) {
    const done = (text, ok) => {
      body.classList.remove("pending");
      body.classList.toggle("undecryptable", !ok);
      body.classList.toggle("decrypted", ok);
      body.textContent = text;
    };
    if (!room.key) {
      done("cannot decrypt", false);
      body.title = "No key for this room: set it with “Set room key”.";
      room.locked.push({ message, body });
      return;
    }
    const key = room.key;
    decryptMessage(key, message).then(
      (text) => {
        if (body.isConnected && !body.closest(".deleted")) done(text, true);
      },
      () => {
        if (body.closest(".deleted")) return;
        done("cannot decrypt", false);
        body.title = "This message was encrypted with another key or altered.";
        if (room.key === key) room.locked.push({ message, body });
      },
    );
  }

  function setKey(room, key) {
    room.key = key;
    room.e2e = true;
    client.markEncrypted(room.name);
    const locked = room.locked;
    room.locked = [];
    for (const { message, body } of locked) {
      if (body.isConnected && !body.closest(".deleted")) decryptInto(room, message, body);
    }
    refreshRoomItem(room);
  }

  function markDeleted({ room: name, seq, by }) {
    const room = rooms.get(name);
    const li = room?.bySeq.get(seq);
    if (!li) return;
    li.classList.add("deleted");
    li.querySelector(".delete")?.remove();
    const body = li.querySelector(".body");
    body.className = "body";
    body.textContent = by === me?.sub ? "You deleted this message." : "This message was deleted.";
    room.bySeq.delete(seq);
  }

  function showGap({ room: name, restarted }) {
    const room = rooms.get(name);
    if (!room) return;
    if (restarted) {
      // The room's numbering starts again: the messages above can no
      // longer be named by seq (for delete).
      for (const li of room.bySeq.values()) li.querySelector(".delete")?.remove();
      room.bySeq.clear();
    }
    const li = el(
      "li",
      "gap",
      restarted
        ? "The server restarted and lost this room's recent history: messages sent while you were away may be missing."
        : "Some messages sent while you were away could not be recovered.",
    );
    li.setAttribute("role", "note");
    room.list.append(li);
    if (room === active) scrollDown();
  }

  // --- actions ------------------------------------------------------------------

  function explainSend(e) {
    switch (e.code) {
      case "encrypted_room":
        return "Not sent: this room is end-to-end encrypted. Set its key with “Set room key”, then send again.";
      case "disconnected":
        return "Not confirmed: the connection dropped. If the message arrived, it appears above once reconnected; otherwise send it again.";
      case "not_connected":
        return "Not sent: not connected.";
      case "rate_limited":
        return "Not sent: you are sending too fast. Wait a moment.";
      case "no_key":
        return "Not sent: this room is end-to-end encrypted. Set its key with “Set room key” first.";
      default:
        return `Not sent: ${e.message}`;
    }
  }

  async function sendCurrent() {
    const room = active;
    const text = ui.composerInput.value;
    if (!room || text.trim() === "") return;
    ui.composerInput.value = "";
    try {
      if (room.e2e) {
        if (!room.key) throw Object.assign(new Error("no key"), { code: "no_key" });
        const enc = await encryptMessage(room.key, me.sub, text);
        await client.sendEncrypted(room.name, enc);
      } else {
        await client.send(room.name, text);
      }
    } catch (e) {
      if (ui.composerInput.value === "") ui.composerInput.value = text;
      systemLine(room, explainSend(e), "error");
      if (e.code === "encrypted_room" || e.code === "no_key") {
        room.e2e = true;
        refreshRoomItem(room);
        openKeyForm();
      }
    }
  }

  async function makeKey(secret, raw, roomName) {
    return raw ? importRoomKey(secret, roomName) : deriveRoomKey(secret, roomName);
  }

  function joinRoom(name, { e2e = false, key = null, quiet = false } = {}) {
    const existing = rooms.get(name);
    if (existing?.joined) {
      if (key) setKey(existing, key);
      selectRoom(name);
      return Promise.resolve();
    }
    const room = addRoom(name, { e2e, key });
    if (!active || !quiet) selectRoom(name);
    return client.join(name, { e2e }).then(
      () => {
        room.joined = true;
        refreshRoomItem(room);
        updateControls();
      },
      (e) => {
        removeRoom(name);
        if (!quiet) {
          ui.joinError.textContent = `Cannot join ${name}: ${e.message}`;
          show(ui.joinError, true);
        }
      },
    );
  }

  function openKeyForm() {
    if (!active) return;
    show(ui.keyForm, true);
    ui.keyPassphrase.focus();
  }

  // --- library events -----------------------------------------------------------

  client.on("state", setStatus);
  client.on("welcome", ({ user, expires_at }) => {
    me = user;
    ui.identity.textContent = `${user.name} (${user.sub})`;
    ui.identity.title = `Session until ${new Date(expires_at).toLocaleString()}`;
    show(ui.identity, true);
    if (ui.renewForm.hidden) hideNotice();
  });
  client.on("joined", ({ room: name, e2e }) => {
    const room = rooms.get(name);
    if (room) {
      room.joined = true;
      room.e2e = room.e2e || e2e;
      refreshRoomItem(room);
    }
    updateControls();
  });
  client.on("left", ({ room: name, reason, error }) => {
    const room = rooms.get(name);
    if (!room) return;
    if (reason === "left") return;
    room.joined = false;
    refreshRoomItem(room);
    updateControls();
    systemLine(
      room,
      reason === "kicked"
        ? "A moderator removed you from this room. Join it again to come back."
        : `You are no longer in this room${error ? `: ${error.message}` : "."}`,
      "error",
    );
  });
  client.on("gap", showGap);
  client.on("message", renderMessage);
  client.on("deleted", markDeleted);
  client.on("expiring", ({ expires_at, refreshing }) => {
    if (refreshing) return;
    showNotice(`Your session ends at ${formatTime(expires_at)}. Paste a new token to continue without interruption.`, {
      renew: true,
    });
  });
  client.on("refreshed", () => {
    hideNotice();
  });
  client.on("error", ({ code, message }) => {
    showNotice(`${code === "refresh_failed" ? "Could not renew the session" : "The server said"}: ${message}`);
  });
  client.on("invalid", ({ reason }) => {
    invalidFrames += 1;
    document.body.dataset.invalidFrames = String(invalidFrames);
    console.warn(`securechat: dropped a frame from the server (${reason})`);
  });

  // --- form wiring ----------------------------------------------------------------

  ui.tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = ui.tokenInput.value.trim();
    ui.tokenInput.value = "";
    if (token) begin(token, options.join);
  });

  ui.renewForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = ui.renewToken.value.trim();
    ui.renewToken.value = "";
    if (!token) return;
    client.refresh(token).then(
      () => hideNotice(),
      (e) => showNotice(`The new token was refused: ${e.message}`, { renew: true }),
    );
  });
  ui.noticeDismiss.addEventListener("click", hideNotice);
  ui.retryNow.addEventListener("click", () => client.reconnectNow());

  ui.joinE2e.addEventListener("change", () => {
    show(ui.joinKeyFields, ui.joinE2e.checked);
    ui.joinPassphrase.required = ui.joinE2e.checked;
  });

  ui.joinForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    show(ui.joinError, false);
    const name = ui.joinRoom.value.trim();
    if (!isRoomName(name)) {
      ui.joinError.textContent = "A room name is 1 to 128 letters, digits and . _ - : @ +";
      show(ui.joinError, true);
      return;
    }
    const e2e = ui.joinE2e.checked;
    let key = null;
    if (e2e) {
      const secret = ui.joinPassphrase.value;
      if (!secret) {
        ui.joinError.textContent = "Enter the room's passphrase (or uncheck “End-to-end encrypted”).";
        show(ui.joinError, true);
        return;
      }
      try {
        ui.joinError.textContent = "Deriving the room key…";
        show(ui.joinError, true);
        key = await makeKey(secret, ui.joinRaw.checked, name);
        show(ui.joinError, false);
      } catch (e) {
        ui.joinError.textContent = e.message;
        return;
      }
    }
    ui.joinPassphrase.value = "";
    ui.joinRoom.value = "";
    ui.joinE2e.checked = false;
    ui.joinRaw.checked = false;
    show(ui.joinKeyFields, false);
    joinRoom(name, { e2e, key });
  });

  ui.roomLeave.addEventListener("click", () => {
    if (!active) return;
    const name = active.name;
    removeRoom(name);
    client.leave(name).catch(() => {});
  });
  ui.roomKey.addEventListener("click", () => (ui.keyForm.hidden ? openKeyForm() : show(ui.keyForm, false)));
  ui.keyCancel.addEventListener("click", () => show(ui.keyForm, false));
  ui.keyForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const room = active;
    const secret = ui.keyPassphrase.value;
    if (!room || !secret) return;
    try {
      const key = await makeKey(secret, ui.keyRaw.checked, room.name);
      ui.keyPassphrase.value = "";
      ui.keyRaw.checked = false;
      show(ui.keyForm, false);
      setKey(room, key);
      systemLine(room, "Room key set: messages are encrypted in this tab before they are sent.");
    } catch (e) {
      systemLine(room, `Cannot use this key: ${e.message}`, "error");
    }
  });

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    sendCurrent();
  });
  ui.composerInput.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.composer.requestSubmit();
    }
  });

  // --- start ------------------------------------------------------------------------

  function begin(token, join) {
    show(ui.login, false);
    show(ui.chat, true);
    client.setToken(token);
    client.connect();
    const wanted = join?.length ? join : null;
    for (const name of wanted ?? ["general"]) {
      if (isRoomName(name)) joinRoom(name, { quiet: !wanted });
    }
    updateControls();
  }

  if (options.token) {
    begin(options.token, options.join);
  } else {
    show(ui.login, true);
    ui.tokenInput.focus();
  }
  return client;
}

if (document.body?.hasAttribute("data-autostart")) {
  const { token, join } = readFragment();
  startChat({ token, join });
}
