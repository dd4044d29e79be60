#include "client/tls_options.h"

namespace livemig::client {

void add_tls_options(CLI::App* app, TlsSettings& o) {
  app->add_option_function<std::string>(
         "--tls",
         [&o](const std::string& v) {
           auto m = parse_tls_mode(v);
           if (!m) throw CLI::ValidationError("--tls", m.status().message());
           o.mode = *m;
         },
         "TLS to the plugins' peer ports: auto (on when credentials are given), on, off")
      ->type_name("MODE");
  app->add_option("--tls-certificates", o.certificates,
                  "x509 credentials: a directory with ca-cert.pem, client-cert.pem, client-key.pem (QEMU's layout)")
      ->type_name("DIR");
  app->add_option("--tls-psk", o.psk_file, "a pre-shared TLS key file in nbdkit's --tls-psk format (IDENTITY:HEXKEY)")
      ->type_name("FILE");
  app->add_option("--tls-psk-identity", o.psk_identity, "the identity to use from --tls-psk (default: the first)")
      ->type_name("NAME");
}

}  // namespace livemig::client
