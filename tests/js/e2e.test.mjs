// The end-to-end encryption helpers, on node's WebCrypto.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  decryptMessage,
  deriveRoomKey,
  encryptMessage,
  fromBase64,
  generateRawRoomKey,
  importRoomKey,
  validEnc,
} from "../../client/securechat.js";

// Fewer iterations than the default keep the test fast; the derivation is
// the same.
const fast = { iterations: 1000 };
const from = (sub) => ({ sub, name: sub });

describe("room keys and messages", () => {
  test("members with the same passphrase read each other", async () => {
    const alice = await deriveRoomKey("correct horse battery staple", "secret-ops", fast);
    const bob = await deriveRoomKey("correct horse battery staple", "secret-ops", fast);
    assert.equal(alice.kid, bob.kid);
    const enc = await encryptMessage(alice, "alice", "the plan");
    assert.ok(validEnc(enc), "the payload passes the server's shape check");
    assert.equal(fromBase64(enc.iv).length, 12);
    assert.equal(fromBase64(enc.ct).length, "the plan".length + 16);
    assert.equal(await decryptMessage(bob, { room: "secret-ops", from: from("alice"), enc }), "the plan");
  });

  test("every message gets a fresh IV", async () => {
    const key = await deriveRoomKey("pass", "secret-ops", fast);
    const a = await encryptMessage(key, "alice", "same");
    const b = await encryptMessage(key, "alice", "same");
    assert.notEqual(a.iv, b.iv);
    assert.notEqual(a.ct, b.ct);
  });

  test("a wrong passphrase cannot decrypt (and gets no garbage)", async () => {
    const right = await deriveRoomKey("right", "secret-ops", fast);
    const wrong = await deriveRoomKey("wrong", "secret-ops", fast);
    assert.notEqual(right.kid, wrong.kid);
    const enc = await encryptMessage(right, "alice", "hello");
    await assert.rejects(decryptMessage(wrong, { room: "secret-ops", from: from("alice"), enc }), { code: "cannot_decrypt" });
    // Even with the kid forged to match, the GCM tag refuses it.
    await assert.rejects(
      decryptMessage(wrong, { room: "secret-ops", from: from("alice"), enc: { ...enc, kid: wrong.kid } }),
      { code: "cannot_decrypt" },
    );
  });

  test("the same passphrase gives another key in another room", async () => {
    const a = await deriveRoomKey("pass", "secret-a", fast);
    const b = await deriveRoomKey("pass", "secret-b", fast);
    assert.notEqual(a.kid, b.kid);
  });

  test("room and sender are bound: a message moved to another sender or room does not decrypt", async () => {
    const key = await importRoomKey(generateRawRoomKey(), "secret-ops");
    const enc = await encryptMessage(key, "alice", "signed, alice");
    await assert.rejects(decryptMessage(key, { room: "secret-ops", from: from("mallory"), enc }), { code: "cannot_decrypt" });
    const other = { ...key, room: "secret-other" };
    await assert.rejects(decryptMessage(other, { room: "secret-other", from: from("alice"), enc }), { code: "cannot_decrypt" });
  });

  test("a tampered ciphertext does not decrypt", async () => {
    const key = await deriveRoomKey("pass", "secret-ops", fast);
    const enc = await encryptMessage(key, "alice", "hello");
    const ct = fromBase64(enc.ct);
    ct[0] ^= 1;
    const tampered = { ...enc, ct: Buffer.from(ct).toString("base64") };
    await assert.rejects(decryptMessage(key, { room: "secret-ops", from: from("alice"), enc: tampered }), { code: "cannot_decrypt" });
  });

  test("raw keys must be 32 bytes", async () => {
    await assert.rejects(importRoomKey("c2hvcnQ=", "secret-ops"), { code: "invalid_key" });
    await assert.rejects(importRoomKey("not base64!", "secret-ops"), { code: "invalid_key" });
    const key = await importRoomKey(new Uint8Array(32).fill(7), "secret-ops");
    assert.match(key.kid, /^k-[0-9a-f]{16}$/);
  });
});
