#!/usr/bin/env node
// An e-money institution's checkout against Coffer, from Node.js with @grpc/grpc-js and
// @grpc/proto-loader, on the protos as they are (no generated code):
//
//   npm install
//   node emi_merchant.js --target 127.0.0.1:50051 --caller emi-example-shop --protos ../../../protos
//
// It creates the EUR unit (or finds it), a customer's wallet and a merchant's, tops the
// customer up from a bank account (and sends that deposit again with its key, which applies it
// once), pays the merchant for an order, decodes a refused payment and an invalid one to their
// reason and field, and prints both wallets' histories and balances, each amount with the unit
// and scale its answer carries.
//
// Options (or environment): --target (COFFER_TARGET), --caller (COFFER_CALLER), --protos, once
// per directory to load .proto files from (COFFER_PROTOS, directories joined by the path
// delimiter): the directory holding coffer/v1/ and google/rpc/. Exit status: 0 done, 1 an
// unexpected error, 3 the server cannot be reached.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

// How proto-loader turns messages into JavaScript objects:
// - keepCase: fields keep their proto names (wallet_id, not walletId), as in the docs and JSON;
// - longs: String: int64 ids and amounts are strings; a JavaScript number loses precision
//   above 2^53 (9007199254740993 would be sent as 9007199254740992);
// - enums: String: enum values by name ("UNIT_KIND_CURRENCY"), not by number;
// - defaults: true: fields at their zero value (amount 0, empty note) are present;
// - oneofs: true: a oneof's set member is named by a virtual field (Operation.operation).
const loaderOptions = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

const callDeadlineMs = 10_000;
const callerMetadataKey = 'coffer-caller';
const replayedMetadataKey = 'coffer-replayed';
const statusDetailsMetadataKey = 'grpc-status-details-bin';

function options() {
  const { values } = parseArgs({
    options: {
      target: { type: 'string', default: process.env.COFFER_TARGET || '127.0.0.1:50051' },
      caller: { type: 'string', default: process.env.COFFER_CALLER || 'emi-example-shop' },
      protos: { type: 'string', multiple: true },
    },
  });
  let protos = values.protos;
  if (!protos || protos.length === 0) {
    protos = process.env.COFFER_PROTOS
      ? process.env.COFFER_PROTOS.split(path.delimiter).filter(Boolean)
      : [path.resolve(__dirname, '..', '..', '..', 'protos')];
  }
  return { target: values.target, caller: values.caller, protos };
}

// The services, from the protos through proto-loader.
function loadServices(protoDirectories, target) {
  const definition = protoLoader.loadSync(
    ['coffer/v1/units.proto', 'coffer/v1/wallets.proto', 'coffer/v1/transfers.proto'],
    { ...loaderOptions, includeDirs: protoDirectories },
  );
  const v1 = grpc.loadPackageDefinition(definition).coffer.v1;
  const credentials = grpc.credentials.createInsecure();
  return {
    units: new v1.UnitService(target, credentials),
    wallets: new v1.WalletService(target, credentials),
    transfers: new v1.TransferService(target, credentials),
  };
}

// The standard error details (google.rpc.Status and what it holds), through protobufjs, the
// library proto-loader is built on: proto-loader describes messages but does not decode them.
function loadErrorDetails(protoDirectories) {
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) => {
    for (const directory of protoDirectories) {
      const candidate = path.join(directory, target);
      if (fs.existsSync(candidate)) return candidate;
    }
    return protobuf.util.path.resolve(origin, target);
  };
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
  return root;
}

// One unary call as a promise: the response and the trailing metadata (where a replay says so).
function call(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    let response;
    const deadline = Date.now() + callDeadlineMs;
    const unary = client[method](request, metadata, { deadline }, (error, answer) => {
      if (error) reject(error);
      else response = answer;
    });
    unary.on('status', (status) => {
      if (status.code === grpc.status.OK) resolve({ response, trailers: status.metadata });
    });
  });
}

// What a failed call says, as data: its code's name, and from the trailer's google.rpc.Status
// the ErrorInfo (reason, metadata such as `field`) and any BadRequest field violations.
function decodeError(error, details) {
  const decoded = {
    code: grpc.status[error.code],
    message: error.details,
    reason: undefined,
    metadata: {},
    fieldViolations: [],
  };
  const [bytes] = error.metadata ? error.metadata.get(statusDetailsMetadataKey) : [];
  if (!bytes) return decoded;
  const Status = details.lookupType('google.rpc.Status');
  for (const any of Status.decode(bytes).details) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    if (typeName === 'google.rpc.ErrorInfo') {
      const info = details.lookupType(typeName).decode(any.value);
      decoded.reason = info.reason;
      decoded.metadata = { ...info.metadata };
    } else if (typeName === 'google.rpc.BadRequest') {
      const badRequest = details.lookupType(typeName).decode(any.value);
      decoded.fieldViolations = badRequest.field_violations.map((violation) => violation.field);
    }
  }
  return decoded;
}

// Minor units as their unit writes them, exactly (BigInt, no floating point): "2599" of "EUR"
// with scale 2 is "25.99 EUR". Every Transfer, Hold and Balance in an answer carries its `unit`
// and `unit_scale`, so an amount prints from the answer alone.
function money(amount, unit, scale) {
  const minor = BigInt(amount);
  const digits = (minor < 0n ? -minor : minor).toString().padStart(scale + 1, '0');
  const major = scale > 0 ? `${digits.slice(0, -scale)}.${digits.slice(-scale)}` : digits;
  return `${minor < 0n ? '-' : ''}${major} ${unit}`;
}

function historyLine(transfer, walletId) {
  const incoming = transfer.target_wallet_id === walletId;
  const kind = transfer.kind.replace(/^TRANSFER_KIND_/, '').toLowerCase();
  const amount = incoming
    ? `+${money(transfer.amount, transfer.unit, transfer.unit_scale)}`
    : money(`-${transfer.amount}`, transfer.unit, transfer.unit_scale);
  const id = `#${transfer.id}`;
  return `  ${id.padEnd(7)} ${kind.padEnd(10)} ${amount.padStart(14)}  ${transfer.reference || transfer.note}`;
}

async function run({ target, caller, protos }) {
  const { units, wallets, transfers } = loadServices(protos, target);
  const details = loadErrorDetails(protos);
  // Every write names its caller; the server scopes idempotency keys to it. Reads need none.
  const metadata = new grpc.Metadata();
  metadata.set(callerMetadataKey, caller);
  // One order of this shop; a real shop would take the order id from its own database.
  const order = `order-${crypto.randomUUID().slice(0, 8)}`;

  // The unit must exist before its wallets; amounts are printed with each answer's own unit and
  // scale, not with these.
  let eur;
  try {
    eur = (
      await call(units, 'CreateUnit', {
        code: 'EUR', kind: 'UNIT_KIND_CURRENCY', scale: 2,
        name: 'Euro', plural: 'Euros', description: 'The euro, in cents',
      }, metadata)
    ).response.unit;
  } catch (error) {
    if (decodeError(error, details).reason !== 'UNIT_EXISTS') throw error;
    // Someone created EUR with other names: use it as it is.
    eur = (await call(units, 'GetUnit', { code: 'EUR' }, new grpc.Metadata())).response.unit;
  }
  console.log(`unit ${eur.code} scale ${eur.scale}`);

  // A fresh idempotency key per operation; a retry of that operation sends the same key.
  const createWallet = async (owner_id, owner_kind) => (
    await call(wallets, 'CreateWallet', {
      idempotency_key: crypto.randomUUID(), owner_id, owner_kind, unit: 'EUR',
    }, metadata)
  ).response.wallet;
  const customer = await createWallet('customer-ada', 'OWNER_KIND_CUSTOMER');
  const merchant = await createWallet('merchant-bakery', 'OWNER_KIND_MERCHANT');
  console.log(`customer wallet ${customer.id}, merchant wallet ${merchant.id}`);

  // Ids and amounts are int64: strings, both ways.
  const deposit = {
    idempotency_key: `${order}:top-up`,
    wallet_id: customer.id,
    amount: '5000',
    funding_source: 'iban:DE89370400440532013000',
    note: 'top-up by SEPA transfer',
  };
  const topUp = (await call(transfers, 'Deposit', deposit, metadata)).response.transfer;
  console.log(
    `deposited ${money(topUp.amount, topUp.unit, topUp.unit_scale)} (transfer ${topUp.id})`,
  );
  // As a retry after a lost answer would: the same request with the same key applies once.
  const again = await call(transfers, 'Deposit', deposit, metadata);
  const replayed = again.trailers.get(replayedMetadataKey)[0] === 'true';
  console.log(`deposit sent again: transfer ${again.response.transfer.id}, replayed ${replayed}`);

  const payment = (
    await call(transfers, 'Pay', {
      idempotency_key: `${order}:payment`,
      payer_wallet_id: customer.id,
      payee_wallet_id: merchant.id,
      amount: '2599',
      reference: order,
      note: '2 sourdough loaves, 1 cake',
    }, metadata)
  ).response.transfer;
  console.log(
    `paid ${money(payment.amount, payment.unit, payment.unit_scale)} for ${order}`
    + ` (transfer ${payment.id})`,
  );

  // Refusals: more than the customer has, and an amount of zero. No transfer comes back: the
  // amount asked for is in the payer's unit, which its wallet's balance names.
  const { unit, unit_scale } = customer.balance;
  for (const [what, amount] of [['refused', '1000000'], ['invalid', '0']]) {
    try {
      await call(transfers, 'Pay', {
        idempotency_key: crypto.randomUUID(),
        payer_wallet_id: customer.id,
        payee_wallet_id: merchant.id,
        amount,
        reference: `${order}-${what}`,
      }, metadata);
      console.log(`${what}: a payment of ${money(amount, unit, unit_scale)} went through`);
    } catch (error) {
      const refusal = decodeError(error, details);
      if (!refusal.reason) throw error;
      // Bad input is named twice: by the ErrorInfo's metadata.field, and by the BadRequest's
      // field violations.
      const field = refusal.metadata.field ? ` field ${refusal.metadata.field}` : '';
      const violations = refusal.fieldViolations.length > 0
        ? `, BadRequest field ${refusal.fieldViolations.join(', ')}`
        : '';
      console.log(
        `${what}: a payment of ${money(amount, unit, unit_scale)}: ${refusal.code}`
        + ` reason ${refusal.reason}${field}${violations} (${refusal.message})`,
      );
    }
  }

  for (const [title, wallet] of [['customer', customer], ['merchant', merchant]]) {
    console.log(`\n${title} wallet ${wallet.id}, newest first:`);
    let page_token = '';
    do {
      const { response } = await call(
        transfers, 'ListTransfers', { wallet_id: wallet.id, page_token }, new grpc.Metadata(),
      );
      for (const transfer of response.transfers) console.log(historyLine(transfer, wallet.id));
      page_token = response.next_page_token;
    } while (page_token);
    const { balance } = (
      await call(wallets, 'GetBalance', { wallet_id: wallet.id }, new grpc.Metadata())
    ).response;
    console.log(
      `  balance ${money(balance.posted, balance.unit, balance.unit_scale)},`
      + ` available ${money(balance.available, balance.unit, balance.unit_scale)}`,
    );
  }
  for (const client of [units, wallets, transfers]) client.close();
}

run(options()).then(
  () => process.exit(0),
  (error) => {
    const unreachable = error.code === grpc.status.UNAVAILABLE
      || error.code === grpc.status.DEADLINE_EXCEEDED;
    const name = typeof error.code === 'number' ? grpc.status[error.code] : error.name;
    console.error(`error: ${name}: ${error.details || error.message}`);
    process.exit(unreachable ? 3 : 1);
  },
);
