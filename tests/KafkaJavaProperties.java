// Reads a `--out-dir` Kafka Java properties file the way the Kafka Java client's tools load a
// client config (java.util.Properties.load, as org.apache.kafka.common.utils.Utils.loadProps),
// checks the OAUTHBEARER settings it needs, and opens the `file:` token endpoint as a URI the
// way its FileJwtRetriever does, printing the token it finds there. No Kafka client jar can be
// installed here (only crates.io, PyPI, Debian and npm are reachable), so this stands in for
// the client's own parsing of the file, not for its login.
//
// usage: java KafkaJavaProperties.java PROPERTIES_FILE
import java.io.FileInputStream;
import java.net.URI;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Properties;

public class KafkaJavaProperties {
    public static void main(String[] args) throws Exception {
        Properties properties = new Properties();
        try (FileInputStream in = new FileInputStream(args[0])) {
            properties.load(in);
        }
        require(properties, "sasl.mechanism", "OAUTHBEARER");
        require(properties, "sasl.login.callback.handler.class", "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginCallbackHandler");
        String jaas = properties.getProperty("sasl.jaas.config", "");
        if (!jaas.startsWith("org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required")) {
            throw new IllegalStateException("sasl.jaas.config: " + jaas);
        }
        URI endpoint = new URI(properties.getProperty("sasl.oauthbearer.token.endpoint.url"));
        if (!"file".equals(endpoint.getScheme())) {
            throw new IllegalStateException("not a file: token endpoint: " + endpoint);
        }
        System.out.print(Files.readString(Path.of(endpoint)).trim());
    }

    private static void require(Properties properties, String key, String expected) {
        if (!expected.equals(properties.getProperty(key))) {
            throw new IllegalStateException(key + " = " + properties.getProperty(key) + ", expected " + expected);
        }
    }
}
