// A TypeScript/JavaScript team's client: code generated from proto/ with
// protoc-gen-es, calling over grpc-web with connect-web's transport (the one
// a browser console uses; node's fetch drives it here).
//
// Usage: node scenario.mjs GENERATED_DIR BASE_URL EMAIL PASSWORD
// Logs in, lists users with the token, and reads the ErrorInfo of a call
// made without credentials. Prints a JSON summary on stdout.
import { createClient, ConnectError } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";

const [gen, baseUrl, email, password] = process.argv.slice(2);
const { AuthService } = await import(`${gen}/otherix/v1/auth_pb.js`);
const { UserService } = await import(`${gen}/otherix/v1/user_pb.js`);
const { ClusterService } = await import(`${gen}/otherix/v1/cluster_pb.js`);
const { ErrorCode, file_otherix_v1_errors } = await import(`${gen}/otherix/v1/errors_pb.js`);
const { ErrorInfoSchema, BadRequestSchema } = await import(`${gen}/google/rpc/error_details_pb.js`);

const transport = createGrpcWebTransport({ baseUrl, useBinaryFormat: true });
const auth = createClient(AuthService, transport);
const login = await auth.login({ email, password });
const headers = { authorization: `Bearer ${login.accessToken}` };
const users = await createClient(UserService, transport).listUsers({}, { headers });

async function failure(call) {
  try {
    await call();
    return null;
  } catch (e) {
    const err = ConnectError.from(e);
    const info = err.findDetails(ErrorInfoSchema)[0];
    const bad = err.findDetails(BadRequestSchema)[0];
    return { code: err.code, reason: info?.reason, domain: info?.domain, violations: bad?.fieldViolations.map((v) => v.field) ?? [] };
  }
}
const anonymous = await failure(() => createClient(ClusterService, transport).getDefaultPool({}));
const invalid = await failure(() => createClient(ClusterService, transport).setDefaultPool({ name: "Not A Label" }, { headers }));

console.log(
  JSON.stringify({
    user: login.user?.username,
    role: login.user?.role,
    users: users.users.map((u) => u.username),
    anonymous,
    invalid,
    // The error codes are in the generated enum, with their name, gRPC code
    // and HTTP status as options.
    error_codes: Object.keys(ErrorCode).filter((k) => Number.isNaN(Number(k))).length,
    errors_file: file_otherix_v1_errors.name,
  }),
);
